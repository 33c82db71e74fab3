"""Edge patching: run the model with any set of edges ablated, many edge masks as one batch.

An ablated edge w -> r means that the reader r reads w's ablated output (on the corrupt prompts, its
mean over them, or zero) instead of w's current one; everything else is computed as usual. So

    input of r = residual stream - sum over ablated w -> r of (w's current output - w's ablated output)

through r's own copy of its norm (a head's q, k or v: `readers.HeadInputs`; an MLP: its norm's
input; the logits: the final norm's input). "Current" is w's output in this very run: with one edge
ablated it is w's clean output; in a circuit, a writer whose own inputs were ablated passes on what
it now computes (as ACDC and AutoCircuit define it). With every edge ablated each reader reads the
ablated run's input, so the run is the ablated run; with none, hooks change nothing and it is the
clean run, bit for bit.

The steps of `EdgePatcher.run(masks)` (masks [k, n_edges], one row per variant, 1 = ablated):
1. record once the clean run (writers' outputs, each layer's inputs) and the ablated writer outputs;
2. resume at the first layer any ablated edge reads (layers before see no change), the k variants
   stacked along the batch (variant-major), chunked by a memory budget; given a `Reference` (one
   patched run kept, `reference(mask)`), resume instead at the first layer where a variant's
   ablations differ from the reference's, from the reference's residual stream there;
3. as writers run, keep (current - ablated) for those with ablated edges; writers before the resumed
   layer keep their clean difference (or the reference's);
4. at each reader with ablated edges, subtract the masked sum of those differences; a head's input
   changes its q, k or v by f(input - correction) - f(input), added to the module's own value, so a
   reader whose correction is zero keeps its exact value;
5. unembed only each prompt's read position: logits [k, batch, d_vocab].
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.discovery.graph import Graph
from mechscope.discovery.readers import HeadInputs
from mechscope.errors import InputError
from mechscope.metrics import at_positions
from mechscope.models.hooked import HookedModel
from mechscope.patching.resume import LayerInputs
from mechscope.tasks.batch import ContrastiveBatch

ABLATIONS = ("corrupt", "mean", "zero")


@dataclass
class Reference:
    """One patched run, kept so that variants of its mask resume where they first differ from it
    (`EdgePatcher.reference`, `run(..., reference=)`): ACDC's circuit, whose first layers no later step
    changes."""
    coef: Tensor  # [writer, atom]: its ablation coefficients
    resid: list[Tensor]  # per layer, [batch, pos, d_model]: each layer's input in that run
    delta: Tensor  # [writer, batch*pos*d]: each writer's output in that run minus its ablated output


def check_ablation(ablation: str) -> None:
    if ablation not in ABLATIONS:
        raise InputError(f"unknown ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")


class EdgePatcher:
    """The clean and ablated runs of one batch, recorded once; `run(masks)` patches edges on them."""

    def __init__(self, model: HookedModel, graph: Graph, batch: ContrastiveBatch, *, ablation: str = "corrupt",
                 memory_mb: int = 2048, gradients=None):
        check_ablation(ablation)
        if graph.spec.n_layers != model.cfg.n_layers or graph.spec.n_heads != model.cfg.n_heads:
            raise InputError("this graph was built for another model; use Graph.from_model(model)")
        self.model, self.graph, self.batch, self.ablation = model, graph, batch, ablation
        self.memory_mb = memory_mb
        self.heads = HeadInputs(model)
        self.n_layers = model.cfg.n_layers
        # atoms: the separate inputs a reader stands for; atom_reader[a] is the reader it belongs to
        self.atoms = [(part, ri) for ri, r in enumerate(graph.readers) for part in r.parts]
        self.atom_reader = torch.tensor([ri for _, ri in self.atoms])
        self._check_memory()
        self.inputs = LayerInputs(model, len(batch))
        # gradients (a metric): the clean recording is also EAP's gradient pass (eap.CleanGradients), kept
        # as clean_grads [atom, batch*pos*d] with its metric function clean_fn until EAP uses it
        self.clean_grads, self.clean_fn = None, None
        with torch.no_grad():
            from mechscope.discovery.eap import CleanGradients  # (eap reads this module)

            grad_pass = None if gradients is None else CleanGradients(self, gradients)
            with self.inputs.recording(), grad_pass.recording() if grad_pass else contextlib.nullcontext():
                clean, clean_inputs = self.writer_outputs(batch.clean)  # [writer, batch, pos, d_model]
            if grad_pass is not None:
                self.clean_fn, self.clean_grads = grad_pass.finish(clean_inputs["final"])
                clean, clean_inputs = clean.detach(), {key: v.detach() for key, v in clean_inputs.items()}
            self.clean_final = at_positions(clean_inputs["final"], batch.read_pos)  # [batch, d_model]
            self.ablated_final = None  # without corrupt ablation: known only by running with every edge ablated
            if ablation == "corrupt":
                ablated, ablated_inputs = self.writer_outputs(batch.corrupt)
                self.ablated_final = at_positions(ablated_inputs["final"], batch.read_pos)
            else:
                ablated = _mean_over_prompts(self.writer_outputs(batch.corrupt)[0], batch.read_pos) \
                    if ablation == "mean" else torch.zeros_like(clean)
        self.ablated_out = ablated
        self.delta = clean.sub_(ablated)  # [writer, batch, pos, d_model]: what ablating each writer takes away
        del clean  # (the difference took its memory: clean_out is ablated_out + delta)
        # With every writer in the graph, a reader's input with all its edges ablated is the same in
        # every variant: its clean input minus every earlier writer's difference. A circuit with few
        # kept edges is then cheaper as that base plus the kept writers' differences.
        self.full_graph = graph.spec.layers is None and graph.spec.nodes is None
        self.base = self._bases(clean_inputs) if self.full_graph else {}
        self._ablated_values: dict[tuple[int, str], Tensor] = {}  # `ablated_value`'s

    def ablated_value(self, layer: int, kind: str) -> Tensor:
        """Every head's q, k or v (per key/value head) of `layer` when it reads its all-ablated base (that
        of the layer's input, stage 2 * layer + 1), [head, batch, pos, d_head]: the same in every
        patched run, so computed once."""
        key = (layer, kind)
        if key not in self._ablated_values:
            n = self.model.cfg.n_heads if kind == "q" else self.model.cfg.n_kv_heads
            heads = torch.arange(n, device=self.model.device)
            stage = self.base[2 * layer + 1]  # [batch, pos, d_model]
            base = stage.expand(n, *stage.shape)  # [head, batch, pos, d_model]
            with torch.no_grad():
                self._ablated_values[key] = self.heads.value_each(layer, kind, heads, base)
        return self._ablated_values[key]

    @property
    def clean_out(self) -> Tensor:
        """Every writer's clean output, [writer, batch, pos, d_model] (computed: the recording keeps the
        ablated outputs and the differences)."""
        return self.ablated_out + self.delta

    # ---- recording ----------------------------------------------------------------------------
    def writer_outputs(self, tokens: Tensor) -> tuple[Tensor, dict]:
        """Every writer's output on `tokens`, [writer, batch, pos, d_model], and what the readers
        outside attention read: {"final": the final norm's input, ("mlp", l): MLP l's norm's input},
        each [batch, pos, d_model]."""
        rows: dict[str, list[tuple[int, int | None]]] = {}  # hook -> (writer row, head or None)
        for i, w in enumerate(self.graph.writers):
            name = ("blocks.0.hook_resid_pre" if w.kind == "input" else f"blocks.{w.layer}.attn.hook_result"
                    if w.kind == "head" else f"blocks.{w.layer}.hook_mlp_out")
            rows.setdefault(name, []).append((i, w.head if w.kind == "head" else None))
        b, p = tokens.shape
        out = torch.empty(len(self.graph.writers), b, p, self.model.cfg.d_model, dtype=self.model.dtype,
                          device=self.model.device)  # [writer, batch, pos, d_model]

        def keep(act, hook):  # each writer's output goes to its row at once: no layer's per-head result is kept
            with torch.no_grad():
                for i, head in rows[hook.name]:
                    out[i].copy_(act if head is None else act[:, :, head])

        a = self.model.adapter
        seen = {}

        def stop(module, args):  # the final norm's input is all we need: no unembedding of every position
            seen["final"] = args[0]
            raise _Stop

        handles = [a.module(a.final_norm).register_forward_pre_hook(stop)]
        for l in range(self.n_layers):  # what each MLP reads (resid_mid, or resid_pre on parallel models)
            handles.append(a.reader(l, mlp=True).register_forward_pre_hook(  # (OPT's is flattened: unflatten it)
                lambda m, args, l=l: seen.__setitem__(("mlp", l), args[0].view(len(tokens), -1, args[0].shape[-1]))))
        try:
            with self.model.hooks(fwd_hooks=[(n, keep) for n in rows]):
                self.model.hf(input_ids=tokens, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return out, seen

    def _bases(self, clean_inputs: dict) -> dict[int, Tensor]:
        """{reader stage: its input with every edge into it ablated}, [batch, pos, d_model]."""
        stages = sorted({r.stage for r in self.graph.readers})
        w_stage = [w.stage for w in self.graph.writers]
        out, total, i = {}, torch.zeros_like(self.delta[0]), 0
        for stage in stages:
            while i < len(w_stage) and w_stage[i] < stage:
                total = total + self.delta[i]
                i += 1
            layer = (stage - 1) // 2  # odd stages: a layer's input (and a parallel MLP's); even: a sequential MLP's
            if stage == 2 * self.n_layers + 1:
                clean = clean_inputs["final"]
            elif stage % 2 == 0:
                clean = clean_inputs[("mlp", layer)]
            else:
                clean = self.inputs.resid[layer]
            out[stage] = clean - total
        return out

    def recording_bytes(self) -> int:
        """What the recordings take at their peak: each writer's clean output, ablated output and
        difference (the difference then takes the clean output's place), each layer's input and each
        reader stage's all-ablated base, all [batch, pos, d_model]."""
        b, p = self.batch.clean.shape
        n = 3 * len(self.graph.writers) + self.n_layers + 1 + 2 * self.n_layers + 2
        return n * b * p * self.model.cfg.d_model * self.model.dtype.itemsize

    def _check_memory(self) -> None:
        """Refuse, before any forward, recordings that cannot fit in the memory available now."""
        from mechscope.models.hooked import _available_memory

        need, have = self.recording_bytes(), _available_memory()
        if self.model.device.type == "cpu" and have is not None and need > have:
            b, p = self.batch.clean.shape
            raise InputError(f"edge patching {b} prompts of {p} tokens records {need / 2**30:.1f} GiB "
                             f"({len(self.graph.writers)} writers x {b} x {p} x d_model {self.model.cfg.d_model}, three "
                             f"times over), and {have / 2**30:.1f} GiB is available: use fewer or shorter prompts, or a "
                             "graph of fewer writers (Graph.from_model(model, layers=...))")

    # ---- masks ----------------------------------------------------------------------------------
    def atom_mask(self, masks: Tensor) -> Tensor:
        """Edge masks [k, n_edges] -> [k, writer, atom] (in the model's dtype; gradients pass)."""
        g = self.graph
        masks = masks.to(self.model.device, self.model.dtype)  # differentiable for a float mask
        wr = masks.new_zeros(masks.shape[0], len(g.writers), len(g.readers))
        wr = _scatter(wr, g.edges, masks)
        return wr[:, :, self.atom_reader]  # [k, writer, atom]

    def variants_per_chunk(self) -> int:
        b, p = self.batch.clean.shape
        d = self.model.cfg.d_model
        row = b * p * d * self.model.dtype.itemsize * (len(self.graph.writers) + 4 * self.model.cfg.n_heads + 16)
        return max(1, int(self.memory_mb * 2**20 // row))

    # ---- the patched run ------------------------------------------------------------------------
    def run(self, masks: Tensor, reference: Reference | None = None) -> Tensor:
        """Read-position logits [k, batch, d_vocab] with the edges where masks [k, n_edges] is nonzero
        ablated (a float mask m ablates a fraction m; gradients flow to a float mask). With a
        `reference`, each chunk resumes at the first layer where its masks differ from the reference's."""
        if masks.ndim != 2 or masks.shape[1] != self.graph.n_edges:
            raise InputError(f"edge masks must be [variants, {self.graph.n_edges}], not {tuple(masks.shape)}")
        step = self.variants_per_chunk()
        return torch.cat([self._run(masks[i:i + step], reference) for i in range(0, masks.shape[0], step)])

    def reference(self, mask: Tensor) -> Reference:
        """Run the edge mask [n_edges] (1 = ablated) once and keep each layer's input and every
        writer's difference, for `run(..., reference=)` (as much memory again as `delta`)."""
        if mask.shape != (self.graph.n_edges,):
            raise InputError(f"a reference's edge mask must be [{self.graph.n_edges}], not {tuple(mask.shape)}")
        with torch.no_grad():
            return self._run(mask.bool()[None], keep=True)

    def _run(self, masks: Tensor, reference: Reference | None = None, keep: bool = False):
        k, b = masks.shape[0], len(self.batch)
        coef = self.atom_mask(masks)  # [k, writer, atom]
        grad = coef.requires_grad
        touched = coef.ne(0).any(1)  # [k, atom]: rows where the atom has an ablated edge
        if grad:
            touched = torch.ones_like(touched)
        live_atoms = touched.any(0)  # [atom]
        # Where the run resumes: the first atom whose ablations differ from the reference run's (the clean run's)
        differs = touched if reference is None else coef.ne(reference.coef).any(1)  # [k, atom]
        raw = coef
        binary = not grad and bool(((masks == 0) | (masks == 1)).all())
        kept = int((masks == 0).sum()) if binary else 0
        complement = self.full_graph and binary and kept < masks.numel() - kept
        if complement:  # input = base + kept writers' differences (for rows where the atom has an ablated edge)
            coef = self.atom_mask(masks == 0) * touched[:, None, :]  # [k, writer, atom]
        live_writers = coef.ne(0).any(2).any(0) | grad | keep  # [writer]
        layers = [part[1] for (part, _), live in zip(self.atoms, differs.any(0).tolist()) if live]
        start = min(min(layers, default=self.n_layers), self.n_layers - 1)
        prefix = self.delta.flatten(1) if reference is None else reference.delta  # [writer, batch*pos*d]
        state = _RunState(self, coef, touched, k, start, live_writers, complement, prefix, keep)
        resid = self.inputs.resid if reference is None else reference.resid
        hidden = resid[start].repeat(k, 1, 1)  # [k * batch, pos, d_model]
        with state.hooks(live_atoms):
            hidden = self.inputs.run_layers(hidden, start, self.n_layers, k)  # [k * batch, pos, d_model]
        if keep:  # (one row: the reference's own run)
            recorded = state.buf[0] if state.buf is not None else prefix[:0]
            return Reference(raw[0], resid[:start] + [state.resid[l] for l in range(start, self.n_layers)],
                             torch.cat([prefix[:state.n_pre], recorded]))
        hidden = hidden.view(k, b, *hidden.shape[1:])  # [k, batch, pos, d_model]
        final = at_positions(hidden, self.batch.read_pos)  # [k, batch, d_model]
        logit_atoms = [a for a, ((kind, _, _), _) in enumerate(self.atoms) if kind == "logits" and live_atoms[a]]
        if logit_atoms:
            a = logit_atoms[0]
            pairs = state.pairs([a])  # [pairs, 2]
            new = state.reader_inputs([a], pairs, hidden[pairs[:, 0]])  # [pairs, batch, pos, d_model]
            final = final.clone()
            final[pairs[:, 0]] = at_positions(new, self.batch.read_pos)
        return self.model.logits_from_resid(final)  # [k, batch, d_vocab]


class _Stop(Exception):
    """Ends a recording forward at the final norm."""


def _scatter(wr: Tensor, edges: Tensor, masks: Tensor) -> Tensor:
    """wr[:, edges[e, 0], edges[e, 1]] = masks[:, e], differentiably."""
    k, n_w, n_r = wr.shape
    flat = edges[:, 0] * n_r + edges[:, 1]  # [n_edges]
    return wr.view(k, -1).index_add(1, flat.to(masks.device), masks).view(k, n_w, n_r)


def _mean_over_prompts(out: Tensor, read_pos: Tensor) -> Tensor:
    """Each writer's output averaged over prompts, position by position (a prompt counts at the
    positions up to its read position; padding never does), broadcast back to [writer, batch, pos, d]."""
    pos = torch.arange(out.shape[2], device=out.device)
    real = (pos[None, :] <= read_pos[:, None].to(out.device)).to(out.dtype)  # [batch, pos]
    total = (out * real[None, :, :, None]).sum(1)  # [writer, pos, d_model]
    mean = total / real.sum(0).clamp(min=1)[None, :, None]
    return mean[:, None].expand_as(out).clone()


class _RunState:
    """The hooks of one patched run and the (current - ablated) differences they collect.

    Writers come in forward order, so those before the resumed layer are a prefix (their clean, or
    the reference's, differences serve every variant) and the recomputed ones that some reader takes
    fill a buffer [k, slot, batch*pos*d] in order; a reader's correction is then a product with a
    prefix of it, never a copy. (With a
    differentiable mask the differences are kept as separate tensors, so autograd can follow them.)"""

    def __init__(self, patcher: EdgePatcher, coef: Tensor, touched: Tensor, k: int, start: int, live_writers: Tensor,
                 complement: bool, prefix: Tensor, keep: bool = False):
        self.p, self.coef, self.touched, self.k, self.start = patcher, coef, touched, k, start
        self.prefix = prefix  # [writer, batch*pos*d]: the differences of the writers before `start`
        self.keep = keep  # record each layer's input too (a `Reference`)
        self.resid: dict[int, Tensor] = {}
        self.complement = complement  # coef holds the kept edges: input = base + their differences
        # With complement, a touched (variant, atom) pair with no kept edge reads its all-ablated base: the
        # same input in every variant and run, so a head's value there is the patcher's, computed once
        self.free = touched & ~coef.ne(0).any(1) if complement else None  # [k, atom]
        self.stage_of = [r.stage for r in patcher.graph.readers]
        self.live_writers = live_writers
        g = patcher.graph
        self.grad = coef.requires_grad
        self.n_pre = sum(1 for w in g.writers if w.kind == "input" or w.layer < start)  # a prefix: forward order
        self.high = self.n_pre  # writers [0, high) are known
        # The writers after the prefix whose differences some reader takes, in forward order: buf's slots
        self.slots = (live_writers[self.n_pre:].nonzero().flatten() + self.n_pre).cpu()  # [slot]
        self.slot_of = {w: i for i, w in enumerate(self.slots.tolist())}
        self.filled = 0  # slots [0, filled) are recorded
        self.buf: Tensor | None = None  # [k, slot, batch*pos*d]
        self.own: dict[int, Tensor] = {}  # with a differentiable mask: writer -> [k, batch*pos*d]
        self.x_attn: dict[int, Tensor] = {}
        self._attn_cache: dict[int, tuple] = {}
        self.head_writers = {}  # layer -> [(writer index, head)]
        self.mlp_writer = {}
        for w, writer in enumerate(g.writers):
            if writer.kind == "head":
                self.head_writers.setdefault(writer.layer, []).append((w, writer.head))
            elif writer.kind == "mlp":
                self.mlp_writer[writer.layer] = w

    def record(self, w: int, current: Tensor) -> None:
        """Writer w's output in this run, [k, batch, pos, d_model]: keep (current - ablated)."""
        delta = (current - self.p.ablated_out[w]).reshape(self.k, -1)  # [k, batch*pos*d]
        if self.grad:
            self.own[w] = delta
        else:
            if self.buf is None:  # (slots are read only once filled: no zeros needed)
                self.buf = delta.new_empty(self.k, len(self.slots), delta.shape[1])
            self.buf[:, self.slot_of[w]] = delta
            self.filled = self.slot_of[w] + 1
        self.high = max(self.high, w + 1)

    def pairs(self, atoms: list[int]) -> Tensor:
        """The (variant, atom) pairs where an atom has an ablated edge: [pairs, 2] (index into `atoms`)."""
        return self.touched[:, atoms].nonzero()

    def reader_inputs(self, atoms: list[int], pairs: Tensor, x: Tensor) -> Tensor:
        """What each (variant, atom) pair reads: its current input x [pairs, batch, pos, d_model] minus
        the ablated writers' differences, or (complement) its all-ablated base plus the kept ones'."""
        corr = self.correction(atoms, pairs)  # [pairs, batch, pos, d_model]
        if not self.complement:
            return x - corr
        stage = self.stage_of[int(self.p.atom_reader[atoms[0]])]  # the atoms of one call share a stage
        return self.p.base[stage] + corr

    def correction(self, atoms: list[int], pairs: Tensor) -> Tensor:
        """For each (variant j, atom a) pair: sum over writers of coef[j, w, a] * (current - ablated)_w,
        [pairs, batch, pos, d_model]."""
        sub = self.coef[:, :, atoms]  # [k, writer, atom]
        cp = sub[pairs[:, 0], :, pairs[:, 1]]  # [pairs, writer]
        if not self.grad and bool(cp[:, self.high:].ne(0).any()):  # an edge's writer always runs before its reader
            raise RuntimeError("a writer has no recorded output before its reader")
        b, pos, d = self.p.delta.shape[1:]
        out = cp.new_zeros(len(pairs), b * pos * d)  # [pairs, batch*pos*d]
        pre = cp[:, :self.n_pre]  # [pairs, writer]: clean differences, the same for every variant
        used = pre.ne(0).any(0).nonzero().flatten() if not self.grad else torch.arange(self.n_pre)
        if len(used):
            deltas = self.prefix  # [writer, batch*pos*d]
            out = out + (pre[:, used] @ deltas[used] if len(used) < self.n_pre // 2 else pre @ deltas[:self.n_pre])
        if self.grad and self.own:
            ws = sorted(self.own)
            per_variant = torch.bmm(sub[:, ws].transpose(1, 2), torch.stack([self.own[w] for w in ws], 1))
            out = out + per_variant[pairs[:, 0], pairs[:, 1]]  # [pairs, batch*pos*d]
        elif self.buf is not None and self.filled:
            own = sub[:, self.slots[:self.filled].to(sub.device)]  # [k, slot, atom]
            cols = own.ne(0).any(2).any(0).nonzero().flatten()  # the writers some pair reads
            if len(cols):
                if len(cols) < own.shape[1] // 2:  # few: gather them, rather than read every row
                    per_variant = torch.bmm(own[:, cols].transpose(1, 2), self.buf[:, cols])  # [k, atom, b*p*d]
                else:
                    per_variant = torch.bmm(own.transpose(1, 2), self.buf[:, :self.filled])
                out = out + per_variant[pairs[:, 0], pairs[:, 1]]
        return out.view(len(pairs), b, pos, d)

    def attention_inputs(self, layer: int, atoms: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(pairs, inputs [pairs, batch, pos, d_model], the current inputs x there, free pairs) for all of
        a layer's q, k, v atoms at once: the three sites of a layer share one correction. Free pairs
        (`self.free`: they read the all-ablated base) are left out of the first three."""
        if layer not in self._attn_cache:
            pairs = self.pairs(atoms)
            free = pairs[:0]
            if self.free is not None:
                is_free = self.free[:, atoms][pairs[:, 0], pairs[:, 1]]  # [pairs]
                pairs, free = pairs[~is_free], pairs[is_free]
            x = self._view(self.x_attn[layer])[pairs[:, 0]]  # [pairs, batch, pos, d_model]
            self._attn_cache = {layer: (pairs, self.reader_inputs(atoms, pairs, x), x, free)}  # one layer at a time
        return self._attn_cache[layer]

    @contextmanager
    def hooks(self, live_atoms: Tensor):
        p, model, cfg = self.p, self.p.model, self.p.model.cfg
        fwd, handles = [], []
        by_site: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (kind, layer) -> [(atom, head)]
        for a, ((kind, layer, head), _) in enumerate(p.atoms):
            if live_atoms[a] and kind != "logits":
                by_site.setdefault((kind, layer), []).append((a, head))
        for l in range(self.start, cfg.n_layers):
            if any((t, l) in by_site for t in "qkv") or self.keep:
                fwd.append((f"blocks.{l}.hook_resid_pre", self._keep_x(l)))
            layer_atoms = [a for t in "qkv" for a, _ in by_site.get((t, l), [])]
            for t in "qkv":
                if (t, l) in by_site:
                    fwd.append((f"blocks.{l}.attn.hook_{t}", self._replace_head_input(t, l, by_site[(t, l)], layer_atoms)))
            heads = [(w, h) for w, h in self.head_writers.get(l, []) if self.live_writers[w]]
            if heads:
                fwd.append((f"blocks.{l}.attn.hook_result", self._keep_heads(l, heads)))
            w = self.mlp_writer.get(l)
            if w is not None and self.live_writers[w]:
                fwd.append((f"blocks.{l}.hook_mlp_out", self._keep_mlp(w)))
            if ("mlp", l) in by_site:
                norm = model.adapter.reader(l, mlp=True)  # the MLP's norm, or the MLP (OLMo-2)
                handles.append(norm.register_forward_pre_hook(self._replace_mlp_input(by_site[("mlp", l)][0][0])))
        try:
            with model.hooks(fwd_hooks=fwd):
                yield
        finally:
            for h in handles:
                h.remove()

    # ---- hook functions ---------------------------------------------------------------------------
    def _view(self, act: Tensor) -> Tensor:
        return act.view(self.k, len(self.p.batch), *act.shape[1:])

    def _keep_x(self, layer: int):
        def hook(act, _):
            self.x_attn[layer] = act  # [k * batch, pos, d_model]
            if self.keep:
                self.resid[layer] = act.detach()
        return hook

    def _keep_heads(self, layer: int, heads: list[tuple[int, int]]):
        def hook(act, _):  # [k * batch, pos, head, d_model]
            cur = self._view(act)
            for w, h in heads:
                self.record(w, cur[:, :, :, h])
        return hook

    def _keep_mlp(self, w: int):
        def hook(act, _):  # [k * batch, pos, d_model]
            self.record(w, self._view(act))
        return hook

    def _replace_head_input(self, kind: str, layer: int, items: list[tuple[int, int]], layer_atoms: list[int]):
        ours = {a for a, _ in items}
        mine = torch.tensor([a in ours for a in layer_atoms], device=self.p.model.device)  # the layer's atoms of this kind
        head_of = {a: h for a, h in items}

        def hook(act, _):  # [k * batch, pos, head, d_head]
            all_pairs, inputs, x, all_free = self.attention_inputs(layer, layer_atoms)
            keep = mine[all_pairs[:, 1]]
            pairs, inputs, x = all_pairs[keep], inputs[keep], x[keep]  # [pairs, 2], [pairs, batch, pos, d_model] x2
            out = act.clone()
            view = self._view(out)  # [k, batch, pos, head, d_head]
            if len(pairs):
                h = torch.tensor([head_of[layer_atoms[i]] for i in pairs[:, 1].tolist()], device=act.device)  # [pairs]
                new, base = self.p.heads.value_each(layer, kind, h, torch.stack([inputs, x]))  # [pairs, batch, pos, d_head] each
                # The module's own value plus the change: exactly the module's value where nothing is ablated.
                view[pairs[:, 0], :, :, h] = view[pairs[:, 0], :, :, h] + (new - base).to(act.dtype)
            free = all_free[mine[all_free[:, 1]]]  # [free pairs, 2]: every edge into them ablated
            if len(free):
                h = torch.tensor([head_of[layer_atoms[i]] for i in free[:, 1].tolist()], device=act.device)
                view[free[:, 0], :, :, h] = self.p.ablated_value(layer, kind)[h].to(act.dtype)
            return out
        return hook

    def _replace_mlp_input(self, atom: int):
        def hook(module, args):
            pairs = self.pairs([atom])  # [pairs, 2]
            x = args[0].clone()  # [k * batch, pos, d_model]
            view = x.view(self.k, len(self.p.batch), -1, x.shape[-1])  # [k, batch, pos, d_model] (OPT's: flattened)
            view[pairs[:, 0]] = self.reader_inputs([atom], pairs, view[pairs[:, 0]])
            return (x, *args[1:])
        return hook
