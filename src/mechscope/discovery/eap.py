"""Edge attribution patching: EAP (Syed, Rager, Conmy 2023) and EAP-IG (Hanna, Pezzelle, Belinkov 2024).

The effect of ablating an edge w -> r is estimated to first order as

    score(w -> r) = (w's ablated output - w's clean output) . d metric / d (r's input)

summed over prompts and positions (the metric is the mean over prompts), for every edge from one
recorded ablated run and one forward and backward pass:
1. the clean and ablated writer outputs come from the `EdgePatcher`'s recording;
2. one forward from the embeddings (interpolated, for EAP-IG) keeps each layer's input, and one
   backward keeps the gradient at every head's q, k and v, every MLP's input and the final norm's
   input;
3. a head's gradient is carried back to its own input through its slice of the projection and the
   norm's Jacobian (in closed form, `HeadInputs.input_grad`; autograd through `HeadInputs.value`
   where a q/k norm follows the projections); no forward with split inputs is needed. In closed
   form a head's gradient is summed over steps in d_head space, with the norm's rank-one terms
   stacked, and carried to d_model once (`_HeadSums`);
4. the gradients are summed over steps per reader, [reader, batch*pos*d], and the scores are one
   product of them with the writers' differences [writer, batch*pos*d]: no [reader, writer, ...]
   buffer is ever formed, and the differences are read once.

EAP-IG averages the gradients over `steps` points between the ablated and the clean run,
alpha = 1/steps, 2/steps, .., 1 (one step is EAP): method "eap-ig" interpolates the input
embeddings, "eap-ig-activations" every writer's output.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from mechscope.discovery.edges import EdgePatcher
from mechscope.metrics import Metric, at_positions, widen


def edge_attribution(patcher: EdgePatcher, fn: Metric, *, steps: int = 1, interpolate: str = "inputs") -> Tensor:
    """Scores [n_edges] (in at least float32), the gradient averaged over `steps` points. The last
    point (alpha = 1) is the clean run: where the patcher's clean recording was EAP's gradient pass
    too (`EdgePatcher(gradients=...)`, for this metric), its gradients are used, and no pass runs for it."""
    g = patcher.graph
    wide = torch.promote_types(patcher.model.dtype, torch.float32)
    grads = None  # [atom, batch*pos*d]: the gradients summed over steps, then one product with the differences
    clean = patcher.clean_grads is not None and patcher.clean_fn is fn
    if clean:  # the last point's gradients: the other steps add into them (no second buffer of that size)
        grads, patcher.clean_grads = patcher.clean_grads, None  # used once: its memory goes with this call
    else:
        _check_gradient_memory(patcher)
    sums = _HeadSums()  # the heads' gradients in closed form, summed over steps before they reach d_model

    def add(atoms: list[int], grad: Tensor) -> None:
        nonlocal grads
        if grads is None:
            grads = grad.new_zeros(len(patcher.atoms), grad[0].numel())
        grads.index_add_(0, torch.tensor(atoms, device=grads.device), grad.reshape(len(atoms), -1))  # in place

    for step in range(1, steps + 1):
        alpha = step / steps
        if step == steps and clean:
            continue
        for atoms, grad in _reader_grads(patcher, fn, alpha, interpolate, sums):
            add(atoms, grad)
    for atoms, grad in sums.finish(patcher.heads, patcher.model.dtype):
        add(atoms, grad)
    # (ablated - clean) . gradient, as -(clean - ablated) . gradient: no negated copy of the differences
    per_atom = -_writer_atom_products(patcher, patcher.delta.flatten(1), grads).to("cpu", wide)  # [writer, atom]
    per_reader = torch.zeros(len(g.writers), len(g.readers), dtype=wide).index_add_(1, patcher.atom_reader, per_atom)
    return per_reader[g.edges[:, 0], g.edges[:, 1]] / steps  # [n_edges]


def _writer_atom_products(patcher: EdgePatcher, delta: Tensor, grads: Tensor, blocks: int = 4) -> Tensor:
    """delta [writer, n] @ grads.T [n, atom] -> [writer, atom], only where a writer can reach an atom:
    writers come before readers (by stage), so the product runs in `blocks` column blocks of atoms,
    each with the writers before its last reader (about half the arithmetic of the whole product;
    the entries left at zero are no edge)."""
    g = patcher.graph
    w_stage = torch.tensor([w.stage for w in g.writers])  # [writer], ascending
    a_stage = torch.tensor([g.readers[r].stage for _, r in patcher.atoms])  # [atom], ascending
    out = delta.new_zeros(len(g.writers), len(patcher.atoms))
    bounds = torch.linspace(0, len(patcher.atoms), blocks + 1).round().long().tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            n_w = int((w_stage < a_stage[lo:hi].max()).sum())  # the writers any atom of the block reads
            out[:n_w, lo:hi] = delta[:n_w] @ grads[lo:hi].T
    return out


def _check_gradient_memory(patcher: EdgePatcher) -> None:
    """Refuse, before any pass, a gradient sum [atom, batch*pos*d] that cannot fit in memory now."""
    from mechscope.errors import InputError
    from mechscope.models.hooked import _available_memory

    b, p = patcher.batch.clean.shape
    need = len(patcher.atoms) * b * p * patcher.model.cfg.d_model * patcher.model.dtype.itemsize
    have = _available_memory()
    if patcher.model.device.type == "cpu" and have is not None and need > have:
        raise InputError(f"edge attribution sums the gradients at {len(patcher.atoms)} reader inputs over {b} prompts of "
                         f"{p} tokens: {need / 2**30:.1f} GiB, and {have / 2**30:.1f} GiB is available: use fewer or "
                         "shorter prompts, or a graph of fewer readers (Graph.from_model(model, layers=...))")


def _reader_grads(patcher: EdgePatcher, fn: Metric, alpha: float, interpolate: str, sums: "_HeadSums"):
    """One forward and backward at interpolation point alpha; yields (atom indices, gradients
    [atom, batch, pos, d_model]) layer by layer, except the heads' that `sums` takes in closed form."""
    model, batch, cfg = patcher.model, patcher.batch, patcher.model.cfg
    rec = _Recorder(patcher)
    with torch.enable_grad(), rec.hooks(alpha if interpolate == "activations" else None):
        start = patcher.inputs.resid[0]  # [batch, pos, d_model]: the clean run's embeddings
        w0 = patcher.graph.writer_index["input"]
        hidden = patcher.ablated_out[w0] + alpha * (start - patcher.ablated_out[w0])  # [batch, pos, d_model]
        hidden = hidden.detach().requires_grad_(True)
        out = patcher.inputs.run_layers(hidden, 0, cfg.n_layers, 1)  # [batch, pos, d_model]
        final = at_positions(out, batch.read_pos)  # [batch, d_model]
        value = widen(fn(model.logits_from_resid(final), batch)).mean()
        g_final, _ = torch.autograd.grad(value, [final, hidden])  # through every reader to the embeddings
    yield from _per_atom(patcher, rec, g_final, sums)


class _HeadSums:
    """The heads' gradients of several passes (EAP-IG's steps), summed before they are carried to
    d_model: per layer, the terms of `HeadInputs.input_grad_terms` (g / s summed, xhat and along
    stacked), then one [n, batch, pos, d_model] product per layer for all steps (`finish`) instead of
    one per step."""

    def __init__(self):
        self.layers: dict[int, tuple[list[int], list, Tensor, list, list]] = {}

    def add(self, layer: int, atoms: list[int], parts: list[tuple[str, list[int]]], terms: tuple) -> None:
        g, xhat, along = terms
        if layer not in self.layers:
            self.layers[layer] = (atoms, parts, g, [xhat], [along])
            return
        seen = self.layers[layer]
        assert seen[0] == atoms, "the same atoms at every step"
        seen[2].add_(g)  # [batch, pos, n, d_head]
        seen[3].append(xhat)
        seen[4].append(along)

    def finish(self, heads, dtype: torch.dtype):
        """(atom indices, gradients [atom, batch, pos, d_model]) per layer, summed over the passes."""
        for layer, (atoms, parts, g, xhats, alongs) in self.layers.items():
            xhat = None if xhats[0] is None else torch.cat(xhats)  # [t, batch, pos, d_model]
            along = None if alongs[0] is None else torch.cat(alongs)  # [t, batch, pos, n]
            yield atoms, heads.input_grad_from(layer, parts, g, xhat, along).to(dtype)
        self.layers.clear()


class CleanGradients:
    """EAP's gradient pass made by the patcher's own clean recording (alpha = 1 is the clean run): the
    recording forward runs with gradients from a layer-0 input that requires them, under `_Recorder`'s
    hooks (`recording()`); `finish(final)` then takes the metric at the final norm's input and one
    backward, and sums the gradients per atom as `edge_attribution` does: (metric function, [atom,
    batch*pos*d]). It saves EAP one forward (and EAP-IG its last step's)."""

    def __init__(self, patcher: EdgePatcher, metric):
        self.patcher, self.metric = patcher, metric
        self.rec = _Recorder(patcher)
        self.start: Tensor | None = None

    @contextmanager
    def recording(self):
        def start(act, hook):
            self.start = act.detach().requires_grad_(True)  # [batch, pos, d_model]: where the graph begins
            return self.start

        _check_gradient_memory(self.patcher)
        with torch.enable_grad(), self.rec.hooks(None), \
                self.patcher.model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", start)]):
            yield

    def finish(self, final_stream: Tensor) -> tuple[Metric, Tensor]:
        from mechscope.metrics import resolve_metric

        p = self.patcher
        with torch.enable_grad():
            final = at_positions(final_stream, p.batch.read_pos)  # [batch, d_model]
            logits = p.model.logits_from_resid(final)  # [batch, d_vocab]
            _, fn = resolve_metric(self.metric, logits.detach())  # (kl_div: the clean run is its reference)
            value = widen(fn(logits, p.batch)).mean()
            g_final, _ = torch.autograd.grad(value, [final, self.start])
        grads = None  # [atom, batch*pos*d]: every row is written once (each atom is yielded once)
        for atoms, grad in _per_atom(p, self.rec, g_final):
            grads = grad.new_empty(len(p.atoms), grad[0].numel()) if grads is None else grads
            grads[atoms] = grad.flatten(1)
        return fn, grads


def _per_atom(patcher: EdgePatcher, rec: "_Recorder", g_final: Tensor, sums: _HeadSums | None = None):
    """After a gradient pass: (atom indices, gradients [atom, batch, pos, d_model]) layer by layer, the
    heads' carried back to their own inputs (or, where in closed form and `sums` is given, left in
    `sums`)."""
    batch, cfg = patcher.batch, patcher.model.cfg
    for l in range(cfg.n_layers):
        parts = [(kind, rec.atoms[(kind, l)]) for kind in "qkv" if (kind, l) in rec.atoms]
        if parts:
            atoms = [a for _, items in parts for a, _ in items]
            grad = _through_head_inputs(patcher, l, parts, rec.x[l], rec.grads, rec.values, sums, atoms)
            if grad is not None:
                yield atoms, grad
        if ("mlp", l) in rec.atoms:
            yield [rec.atoms[("mlp", l)][0][0]], rec.grads[("mlp", l)][None]
    if ("logits", cfg.n_layers) in rec.atoms:
        full = torch.zeros_like(patcher.inputs.resid[0])  # [batch, pos, d_model]: only read positions matter
        full[torch.arange(len(batch)), batch.read_pos] = g_final.to(full.dtype)
        yield [rec.atoms[("logits", cfg.n_layers)][0][0]], full[None]


def _through_head_inputs(patcher, layer, parts, x, grads, values, sums=None, atoms=None) -> Tensor | None:
    """d metric / d (each head's own input), for a layer's q, k and v heads: in closed form where the
    norm comes before the projections (`HeadInputs.input_grad`, all of them in one product), else the
    vector-Jacobian product of the per-head projections (one copy of the norm per head input).

    x [batch, pos, d_model]; parts [(kind, [(atom, head)])]; grads[(kind, layer)] and values[(kind,
    layer)] (the forward's q, k or v) [batch, pos, head, d_head] -> [n, batch, pos, d_model], in the
    order of `parts`; None where the closed form's terms went into `sums`."""
    per_kind = [(kind, [h for _, h in items]) for kind, items in parts]
    per_kind = [(kind, hs, grads[(kind, layer)][:, :, hs]) for kind, hs in per_kind]  # (kind, heads, [batch, pos, n_kind, d_head])
    terms = patcher.heads.input_grad_terms(layer, per_kind, x, [values[(kind, layer)][:, :, hs] for kind, hs, _ in per_kind])
    if terms is not None:
        heads = [(kind, hs) for kind, hs, _ in per_kind]
        if sums is not None:
            sums.add(layer, atoms, heads, terms)
            return None
        return patcher.heads.input_grad_from(layer, heads, *terms).to(x.dtype)
    n = sum(len(hs) for _, hs, _ in per_kind)
    with torch.enable_grad():
        xs = x.detach()[:, :, None, :].expand(*x.shape[:2], n, x.shape[-1]).clone().requires_grad_(True)
        values, cotangents, i = [], [], 0
        for kind, hs, g in per_kind:
            values.append(patcher.heads.value(layer, kind, hs, xs[:, :, i:i + len(hs)]))  # [batch, pos, n_kind, d_head]
            cotangents.append(g.to(values[-1].dtype))
            i += len(hs)
        g, = torch.autograd.grad(values, xs, cotangents)
    return g.permute(2, 0, 1, 3)  # [n, batch, pos, d_model]


class _Recorder:
    """The hooks of one gradient pass: inputs to each layer, the heads' q, k and v, gradients at
    every reader."""

    def __init__(self, patcher: EdgePatcher):
        self.p = patcher
        self.x: dict[int, Tensor] = {}
        self.grads: dict[tuple[str, int], Tensor] = {}
        self.values: dict[tuple[str, int], Tensor] = {}
        self.atoms: dict[tuple[str, int], list[tuple[int, int | None]]] = {}
        for a, ((kind, layer, head), _) in enumerate(patcher.atoms):
            self.atoms.setdefault((kind, layer), []).append((a, head))

    @contextmanager
    def hooks(self, alpha: float | None):
        model = self.p.model
        fwd, bwd, handles, seen = [], [], [], set()
        for (kind, l) in self.atoms:
            if kind in "qkv":
                if l not in seen:
                    seen.add(l)
                    fwd.append((f"blocks.{l}.hook_resid_pre", self._keep_x(l)))
                fwd.append((f"blocks.{l}.attn.hook_{kind}", self._keep_value(kind, l)))
                bwd.append((f"blocks.{l}.attn.hook_{kind}", self._keep_grad(kind, l)))
            elif kind == "mlp":
                norm = model.adapter.reader(l, mlp=True)  # the MLP's norm, or the MLP (OLMo-2)
                handles.append(norm.register_forward_pre_hook(self._tap_mlp(l)))
        self.alpha = alpha
        if alpha is not None:  # eap-ig-activations: every writer's output interpolated
            fwd += self._interpolations(alpha)
        try:
            with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                yield
        finally:
            for h in handles:
                h.remove()

    def _keep_x(self, layer):
        def hook(act, _):
            self.x[layer] = act.detach()
        return hook

    def _keep_value(self, kind, layer):
        def hook(act, _):
            self.values[(kind, layer)] = act.detach()
        return hook

    def _keep_grad(self, kind, layer):
        def hook(grad, _):
            self.grads[(kind, layer)] = grad.detach()
        return hook

    def _tap_mlp(self, layer):
        def hook(module, args):
            x = args[0].view_as(args[0])  # a node of its own: its gradient is the MLP path's only
            pos = self.p.batch.clean.shape[1]  # (OPT's MLP sees [batch * pos, d_model]: unflattened here)
            x.register_hook(lambda g: self.grads.__setitem__(("mlp", layer), g.detach().view(-1, pos, g.shape[-1])))
            return (x, *args[1:])
        return hook

    def _interpolations(self, alpha: float) -> list:
        p = self.p
        heads: dict[int, list[tuple[int, int]]] = {}
        out = []
        for w, writer in enumerate(p.graph.writers):
            if writer.kind == "head":
                heads.setdefault(writer.layer, []).append((w, writer.head))
            elif writer.kind == "mlp":
                out.append((f"blocks.{writer.layer}.hook_mlp_out", self._mix([w], None)))
        out += [(f"blocks.{l}.attn.hook_result", self._mix([w for w, _ in ws], [h for _, h in ws]))
                for l, ws in heads.items()]
        return out

    def _mix(self, writers: list[int], heads: list[int] | None):
        p = self.p
        ablated, delta = p.ablated_out[writers], p.delta[writers]  # [w, batch, pos, d_model]

        def hook(act, _):
            # The interpolated value, with the gradient of the computed one (straight through): the
            # gradient still reaches this writer's own inputs.
            value = ablated + self.alpha * delta  # [w, batch, pos, d_model]
            if heads is None:
                return act + (value[0].to(act.dtype) - act).detach()
            idx = torch.tensor(heads, device=act.device)
            target = act.detach().clone()
            target[:, :, idx] = value.permute(1, 2, 0, 3).to(act.dtype)  # [batch, pos, head, d_model]
            return act + (target - act).detach()
        return hook
