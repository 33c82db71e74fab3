"""Path patching (Wang et al. 2022, Appendix B): the effect of one sender head on the metric through
chosen receivers only.

For each sender head s:
1. run the target with every head's output (hook_z) frozen to its value on the target run, except
   s, which takes its value on the source run; MLPs are recomputed. Record what the receivers get:
   the final residual stream (receivers="logits"), or the q, k or v input of the receiver heads.
2. for head receivers, run the target again with only those inputs patched to the recorded values
   (at every position, or at each prompt's read position) and measure the metric.

The paper patches senders to their values on the corrupted (ABC) distribution inside clean runs:
that is direction="noise", the default here. Senders run as one batch per layer, resuming from
the target's residual stream at the sender's layer, like the exact engine.

Two exact shortcuts when receivers read one position per prompt (the logits at the read position,
or `at` = "read" or given positions):
- in step 1 every head after the sender is frozen, so no position reads another any more: each
  position is its own computation, and step 1 runs only the position the receivers read;
- in step 2 the positions before the patched one are the target's, so each prompt runs from its
  patched position on, over the target's keys and values (patching/suffix.py). Step 2 starts at
  the first receiver's layer whatever the sender's, so it runs every sender's variants together,
  with the prompts in groups of similar length (each group as long as its own longest prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mechscope.cache import ActivationCache
from mechscope.errors import InputError
from mechscope.metrics import Metric, at_positions, check_baselines, narrow, resolve_metric
from mechscope.models.hooked import HookedModel, technique
from mechscope.patching.exact import _mean_metric, _variants_per_chunk, masked_writer, variant_mask
from mechscope.patching.result import PatchResult
from mechscope.patching.resume import LayerInputs
from mechscope.patching.sites import SITES
from mechscope.patching.suffix import length_buckets
from mechscope.progress import progress_bar
from mechscope.tasks.batch import ContrastiveBatch


LEAST_ROWS = 128  # rows (senders x prompts) of one step-2 run at least: fewer run matmuls slowly


@technique
def path_patch(
    model: HookedModel,
    batch: ContrastiveBatch,
    *,
    receivers: str | Sequence[tuple[int, int]] = "logits",
    receiver_input: str = "q",
    at: str | Tensor = "all",
    metric: str | Metric = "logit_diff",
    direction: str = "noise",
    senders: Sequence[tuple[int, int]] | None = None,
    progress: bool = False,
    runs: "PathRuns | None" = None,
    memory_mb: int = 512,
) -> PatchResult:
    """Effect of every sender head (layer x head, for the layers before the last receiver) on the
    metric through the receivers: metric(path-patched) - metric(target), averaged over prompts.

    receivers: "logits" (the final residual stream) or [(layer, head), ...] (negative indices count
    from the end) whose `receiver_input`
    ("q", "k" or "v"; k and v name key/value heads) is patched, at every position (`at="all"`), at
    each prompt's read position (`at="read"`) or at one given position per prompt (`at`: [batch]
    positions, e.g. IOI's S2). senders: only these (layer, head) (the other cells
    are NaN); default every head before the last receiver.

    The default direction is "noise" (corrupt senders into the clean run), unlike
    `activation_patch`'s "denoise": path patching asks which paths the clean behaviour needs, as
    Wang et al. 2022 ran it, so breaking one path at a time in the clean run is the question.

    runs: the recorded source and target runs (`record_runs(model, batch, direction)`), to share
    between calls on one batch (the IOI study patches into several receivers); recorded if None.
    memory_mb: roughly how much memory the variants of one batch may take (senders per batch).
    """
    start = time.perf_counter()
    cfg = model.cfg
    to_logits = receivers == "logits"
    receivers = check_receivers(model, batch, receivers, receiver_input, at)
    last = cfg.n_layers if to_logits else max(layer for layer, _ in receivers)
    chosen = {l: list(range(cfg.n_heads)) for l in range(last)}
    if senders is not None:
        senders = [_from_end(s, cfg.n_layers, cfg.n_heads) for s in senders]
        bad = [s for s in senders if not (0 <= s[0] < last and 0 <= s[1] < cfg.n_heads)]
        if bad:
            raise InputError(f"senders {bad} are not heads before layer {last} (the last receiver's layer)")
        chosen = {l: sorted({h for sl, h in senders if sl == l}) for l in range(last)}
    sender_layers = list(range(last))
    if not sender_layers:
        raise InputError("no head sits before the receivers: choose receivers in a later layer")

    recv_names = sorted({f"blocks.{l}.attn.hook_{receiver_input}" for l, _ in receivers}) if not to_logits else []
    runs = runs_for(model, batch, direction, runs)
    inputs, source_cache, target_cache = runs.inputs, runs.source_cache, runs.target_cache
    one_position = (to_logits or not (isinstance(at, str) and at == "all")) and inputs.resumable
    # Where the receivers read, per prompt: [batch]
    where = batch.read_pos if to_logits or isinstance(at, str) and at == "read" else at
    where = where.to(model.device) if isinstance(where, Tensor) else where
    name, fn, baseline, clean_metric, corrupt_metric = runs.metric(metric)
    tokens, fn = narrow(fn, batch)  # patched runs unembed only the logits the metric reads

    wide = torch.promote_types(model.dtype, torch.float32)  # float64 models measure in float64
    values = torch.full((len(sender_layers), cfg.n_heads), float("nan"), dtype=wide)
    pending: list[tuple[int, list[int], dict[str, Tensor]]] = []  # step 1 done, step 2 to run for all at once
    with torch.no_grad(), progress_bar(progress, sum(len(h) for h in chosen.values()), "path patching") as bar:
        for layer in sender_layers:
            heads = chosen[layer]
            k = len(heads)  # one variant per sender head of this layer
            if not k:
                continue
            if one_position:
                done = _one_position(model, inputs, batch, fn, tokens, layer, heads, last, where, to_logits,
                                     recv_names, source_cache, target_cache)
                if to_logits:
                    values[layer, heads] = (done - baseline).cpu()
                    bar.advance(k)
                else:
                    pending.append((layer, heads, done))
                continue
            frozen = _freeze_hooks(model, layer, heads, len(batch), source_cache, target_cache)
            hidden = inputs.resid[layer].repeat(k, 1, 1)  # [k * batch, pos, d_model]
            if to_logits:
                with model.hooks(fwd_hooks=frozen):
                    logits = inputs.run(hidden, layer, k, batch.read_pos, tokens=tokens)  # [k, batch, d_vocab]
            else:
                recorded = {n: target_cache[n].repeat(k, *([1] * (target_cache[n].ndim - 1))) for n in recv_names}

                def record(act, hook, recorded=recorded):
                    recorded[hook.name] = act.detach().clone()

                with model.hooks(fwd_hooks=frozen + [(n, record) for n in recv_names]):
                    inputs.run_layers(hidden, layer, last + 1, k)
                logits = _into_receivers(model, inputs, batch, receivers, receiver_input, at, recorded, k, tokens)
            values[layer, heads] = (_mean_metric(fn, logits, batch) - baseline).cpu()
            bar.advance(k)
        if pending:  # step 2 of every sender at once: it starts at the first receiver's layer, whatever the sender's
            recorded = {n: torch.cat([r[n] for *_, r in pending]) for n in recv_names}  # [senders * batch, head, d_head]
            patched = _into_receivers_at(model, inputs, batch, fn, tokens, receivers, recorded, where,
                                         _variants_per_chunk(model, batch, memory_mb), bar)  # [senders]
            done = 0
            for layer, heads, _ in pending:
                values[layer, heads] = (patched[done:done + len(heads)] - baseline).cpu()
                done += len(heads)

    labels = {"layer": [str(l) for l in sender_layers], "head": [str(h) for h in range(cfg.n_heads)]}
    receiver_text = "logits" if to_logits else [f"{l}.{h}" for l, h in receivers]
    return PatchResult(
        values=values, axes=("layer", "head"), labels=labels, site="head_z", technique="path",
        metric=name, direction=direction, clean_metric=clean_metric, corrupt_metric=corrupt_metric,
        model=cfg.model_name, n_prompts=len(batch), seconds=time.perf_counter() - start,
        extra={"receivers": receiver_text, "receiver_input": None if to_logits else receiver_input,
               "at": at.tolist() if isinstance(at, Tensor) else at},
    )


@dataclass
class PathRuns:
    """What path patching reads from the source and target runs of one batch: the logits at the read
    positions and every head's z on both, the target's q, k and v, and the target's layer inputs
    with their keys and values."""

    batch: ContrastiveBatch
    direction: str
    source_read: Tensor  # [batch, d_vocab]: the logits at each prompt's read position
    target_read: Tensor
    source_cache: ActivationCache
    target_cache: ActivationCache
    inputs: LayerInputs

    def metric(self, metric: str | Metric):
        """(name, per-prompt function, the target's mean metric, the clean one, the corrupt one), the
        baselines checked."""
        name, fn = resolve_metric(metric, self.target_read if self.direction == "noise" else self.source_read)
        target = _mean_metric(fn, self.target_read[None], self.batch).item()
        source = _mean_metric(fn, self.source_read[None], self.batch).item()
        clean, corrupt = (target, source) if self.direction == "noise" else (source, target)
        check_baselines(name, clean, corrupt)
        return name, fn, target, clean, corrupt


def check_receivers(model: HookedModel, batch: ContrastiveBatch, receivers, receiver_input: str, at):
    """"logits", or the receiver heads with negative indices counted from the end; a clear error for
    a receiver input, a place or a head that is not one."""
    if isinstance(receivers, str) and receivers == "logits":
        return receivers
    cfg = model.cfg
    positions = isinstance(at, Tensor) and at.shape == (len(batch),)
    if receiver_input not in ("q", "k", "v") or not (positions or at in ("all", "read")) or not receivers:
        raise InputError("receivers need receiver_input 'q', 'k' or 'v', at 'all', 'read' or one position per "
                         "prompt, and at least one head")
    n_recv = cfg.n_heads if receiver_input == "q" else cfg.n_kv_heads
    receivers = [_from_end(r, cfg.n_layers, n_recv) for r in receivers]
    bad = [r for r in receivers if not (0 <= r[0] < cfg.n_layers and 0 <= r[1] < n_recv)]
    if bad:
        raise InputError(f"receivers {bad} are not heads of this model ({cfg.n_layers} layers, {n_recv} "
                         f"{receiver_input} heads)")
    return receivers


def runs_for(model: HookedModel, batch: ContrastiveBatch, direction: str, runs: "PathRuns | None") -> "PathRuns":
    """The given recorded runs if they belong to this batch and direction, else recorded now."""
    if runs is None:
        return record_runs(model, batch, direction)
    if runs.batch is not batch or runs.direction != direction:
        raise InputError("these recorded runs belong to another batch or direction; record them with "
                         "record_runs(model, batch, direction) for this call")
    return runs


def _from_end(head, n_layers: int, n_heads: int) -> tuple[int, int]:
    """(layer, head) with negative indices counted from the end (out-of-range ones stay, to be named)."""
    layer, h = (int(x) for x in head)
    return (layer + n_layers if -n_layers <= layer < 0 else layer, h + n_heads if -n_heads <= h < 0 else h)


@technique
def record_runs(model: HookedModel, batch: ContrastiveBatch, direction: str = "noise") -> PathRuns:
    """Record the runs `path_patch(..., runs=)` reads (three forwards), once for many calls."""
    source, target = batch.source_and_target(direction)
    n_layers = model.cfg.n_layers
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    qkv = [f"blocks.{l}.attn.hook_{x}" for l in range(n_layers) for x in "qkv"]
    inputs = LayerInputs(model, len(batch))
    with torch.no_grad():  # the logits at the read positions only, as patched runs read them
        source_final, source_cache = model.run_with_cache(source, names_filter=z_names, stop_at_layer=n_layers)
        with inputs.recording(keys_values=True):
            target_final, target_cache = model.run_with_cache(target, names_filter=z_names + qkv,
                                                              stop_at_layer=n_layers)  # [batch, pos, d_model]
        source_read = model.logits_from_resid(at_positions(source_final, batch.read_pos))  # [batch, d_vocab]
        target_read = model.logits_from_resid(at_positions(target_final, batch.read_pos))
    return PathRuns(batch, direction, source_read, target_read, source_cache, target_cache, inputs)


def _one_position(model, inputs: LayerInputs, batch, fn, tokens, layer, heads, last, where, to_logits, recv_names,
                  source_cache, target_cache) -> Tensor | dict[str, Tensor]:
    """Step 1 for receivers that read one position per prompt (`where` [batch]), for the k =
    len(heads) senders of `layer`: with receivers="logits" the mean metric of each, [k]; else what
    each variant's receivers get at their position, {hook name: [k * batch, head, d_head]}."""
    b, k = len(batch), len(heads)
    starts = where.repeat(k)  # [k * batch]
    point = inputs.suffix(starts, batch.read_pos, length=1)  # the patched position only
    head_mask = torch.zeros(k, model.cfg.n_heads, dtype=torch.bool, device=model.device)  # [k, head]
    head_mask[torch.arange(k), torch.tensor(heads)] = True
    sender = head_mask.repeat_interleave(b, 0)[:, None, :, None]  # [k * batch, 1, head, 1]
    hooks = []
    for l in range(layer, model.cfg.n_layers if to_logits else last + 1):
        name = f"blocks.{l}.attn.hook_z"
        frozen = point.first(target_cache[name])[:, None]  # [k * batch, 1, head, d_head]: the target's z there
        if l == layer:
            frozen = torch.where(sender, point.first(source_cache[name])[:, None], frozen)
        hooks.append((name, lambda act, hook, z=frozen: z))
    hidden = point.gather(inputs.resid[layer])  # [k * batch, 1, d_model]
    if to_logits:
        with model.hooks(fwd_hooks=hooks):
            return _mean_metric(fn, inputs.run(hidden, layer, k, batch.read_pos, point, tokens), batch)  # [k]

    # [k * batch, head, d_head] per receiver input; a receiver before the sender's layer keeps the target's
    recorded = {n: point.first(target_cache[n]) for n in recv_names}

    def record(act, hook):
        recorded[hook.name] = act[:, 0].detach().clone()

    with model.hooks(fwd_hooks=hooks + [(n, record) for n in recv_names]):
        inputs.run_layers(hidden, layer, last + 1, k, point)
    return recorded


def _into_receivers_at(model, inputs: LayerInputs, batch, fn, tokens, receivers, recorded: dict[str, Tensor],
                       where: Tensor, per_chunk: int, bar) -> Tensor:
    """Step 2 at one position per prompt (`where` [batch]) for n senders at once: from each prompt's
    patched position on, the receivers' inputs there set as recorded ({hook name: [n * batch, head,
    d_head]}), resumed at the first receiver's layer. Chunks of `per_chunk` senders; the prompts in
    groups of similar length (rows run from the patched position to the read position, so a group
    pays only for its own longest). The mean metric of each sender, [n]."""
    b = len(batch)
    n = len(next(iter(recorded.values()))) // b
    first = min(l for l, _ in receivers)
    heads_of = {name: [h for l, h in receivers if l == int(name.split(".")[1])] for name in recorded}
    lengths = (batch.read_pos.to(where.device) - where).clamp(min=0) + 1  # [batch]: positions each prompt runs
    means = []
    for lo in range(0, n, per_chunk):
        k = min(per_chunk, n - lo)
        logits = None  # [k, batch, d_vocab]
        for group in length_buckets(lengths, buckets=4, least=-(-LEAST_ROWS // k)):
            group = group.to(where.device)  # [g]
            prompt = group.repeat(k)  # [k * g]: variant-major
            suffix = inputs.suffix(where[prompt], batch.read_pos, prompt=prompt)
            writes = []
            for name, value in recorded.items():
                rows = value.view(n, b, *value.shape[1:])[lo:lo + k, group].flatten(0, 1)  # [k * g, head, d_head]

                def write(act, hook, rows=rows, heads=heads_of[name]):
                    out = act.clone()  # [k * g, length, head, d_head]
                    out[:, 0, heads] = rows[:, heads]
                    return out

                writes.append((name, write))
            with model.hooks(fwd_hooks=writes):
                hidden = suffix.gather(inputs.resid[first])  # [k * g, length, d_model]
                part = inputs.run(hidden, first, k, batch.read_pos, suffix, tokens)  # [k, g, d_vocab or tokens]
            logits = part.new_empty(k, b, part.shape[-1]) if logits is None else logits
            logits[:, group] = part
        means.append(_mean_metric(fn, logits, batch))  # [k]
        bar.advance(k)
    return torch.cat(means)


def _freeze_hooks(model, layer: int, heads: list[int], b: int, source_cache, target_cache) -> list:
    """Variant j: head heads[j] of `layer` takes the source's z; every head of every later layer keeps
    the target's z (frozen), whatever the sender changed upstream of it."""
    hooks, k = [], len(heads)
    spec = SITES["head_z"]
    for l in range(layer, model.cfg.n_layers):
        name = f"blocks.{l}.attn.hook_z"
        z_target = target_cache[name]  # [batch, pos, head, d_head]
        if l == layer:
            mask = variant_mask(spec, z_target.shape[1:], [(h, None) for h in heads])
            hooks.append((name, masked_writer(source_cache[name], mask, b)))
        else:
            hooks.append((name, lambda act, hook, z=z_target: z.repeat(k, 1, 1, 1)))
    return hooks


def _into_receivers(model, inputs: LayerInputs, batch, receivers, receiver_input, at, recorded, k, tokens) -> Tensor:
    """Step 2: the target again, with the receivers' inputs set to what step 1 recorded: [k, batch, d_vocab]."""
    b = len(batch)
    first = min(layer for layer, _ in receivers)
    hooks = []
    for name, value in recorded.items():
        layer = int(name.split(".")[1])
        heads = [h for l, h in receivers if l == layer]

        def write(act, hook, value=value, heads=heads):
            out = act.clone()  # [k * batch, pos, head, d_head]
            if isinstance(at, str) and at == "all":
                out[:, :, heads] = value[:, :, heads]
            else:
                rows = torch.arange(k * b)
                pos = (at if isinstance(at, Tensor) else batch.read_pos).to(out.device).repeat(k)  # [k * batch]
                for h in heads:
                    out[rows, pos, h] = value[rows, pos, h]
            return out

        hooks.append((name, write))
    hidden = inputs.resid[first].repeat(k, 1, 1)  # [k * batch, pos, d_model]
    with model.hooks(fwd_hooks=hooks):
        return inputs.run(hidden, first, k, batch.read_pos, tokens=tokens)
