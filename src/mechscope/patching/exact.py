"""Exact activation patching, fast: the numbers of one forward per component, at a fraction of the cost.

For every component (a layer, a head, optionally at one position) the engine puts the source run's
activation into the target run (denoising: clean into corrupt; noising: corrupt into clean) and
measures the metric. Five things make it fast without changing a number:
1. each patched run resumes from the target's cached residual stream at the patched layer;
2. the variants of one layer run as one batch (chunked by `memory_mb`), each row patching its own
   component through a mask;
3. only the positions the metric reads are unembedded, and for logit_diff only the two tokens it
   reads (`metrics.narrow`);
4. positions before the first one a variant changes are the target's, so each row runs only from
   there on, on top of the target's keys and values (patching/suffix.py): the patched position
   per position, the first token where source and target differ otherwise;
5. per position, a position before every prompt's first difference is not run at all: both runs
   hold the same activation there (it sees the same tokens), so its effect is 0.
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch
from torch import Tensor

from mechscope.metrics import Metric, check_baselines, narrow, read_logits, resolve_metric, widen
from mechscope.models.hooked import HookedModel, technique
from mechscope.patching.result import PatchResult
from mechscope.progress import progress_bar
from mechscope.patching.resume import LayerInputs
from mechscope.patching.suffix import Suffix
from mechscope.patching.sites import PatchSite, resolve_site
from mechscope.tasks.batch import ContrastiveBatch


PREFIX_WORTH = 0.25  # the shared prefix, as a fraction of the positions, from which skipping it pays


@technique
def activation_patch(
    model: HookedModel,
    batch: ContrastiveBatch,
    *,
    site: str,
    metric: str | Metric = "logit_diff",
    direction: str = "denoise",
    per_position: bool = False,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    progress: bool = False,
    memory_mb: int = 1024,
    per_query_head: bool = False,
) -> PatchResult:
    """Patch every component of `site` and return the effect on the metric.

    `values[...]` = metric of the patched run - metric of the run it patches into, averaged over
    prompts. Axes: (layer,) or (layer, pos) for resid_pre|mid|post, attn_out, mlp_out; (layer, head)
    or (layer, head, pos) for head_z|q|k|v|pattern|result. `site` may also be TransformerLens's name
    ("z", "resid_pre") or a hook name ("blocks.3.attn.hook_z": that layer only, unless `layers`).

    k and v are patched per key/value head by default: on a grouped-query model that is the unit the
    model has (one k/v head feeds a group of query heads, so patching "query head 5's k" alone does
    not exist). `per_query_head=True` lays the result out per query head, as TransformerLens's does,
    so all head sites stack: each query head then shows the effect of its group's k/v head.

    The default direction is "denoise" (clean activations into the corrupt run: what restores the
    behaviour), as in TransformerLens's patching demos; `path_patch` defaults to "noise", because
    path patching asks which paths the clean run needs (Wang et al. 2022).
    """
    start = time.perf_counter()
    spec, named_layer = resolve_site(site)
    if named_layer is not None and layers is None:  # "blocks.3.attn.hook_z": layer 3
        layers = [named_layer]
    source, target = batch.source_and_target(direction)
    layers, heads = spec.components(model, layers, heads)
    n_pos = batch.clean.shape[1]
    positions = list(range(n_pos)) if per_position else [None]

    hooks = [spec.hook_name(layer) for layer in layers]
    inputs = LayerInputs(model, len(batch))
    differ = _first_difference(source, target)  # [batch]
    # Runs start at a position for every site but the pattern, whose key axis is not cut. Patching
    # every position skips the shared prefix only where it is long enough to pay for the cut rows
    # (smollm2, IOI: a 2-token prefix of 15 made head_z slower, 4.5 against 3.9 s).
    by_position = spec.pos_dim == 0 and (per_position or int(differ.min()) >= PREFIX_WORTH * n_pos)
    with torch.no_grad():
        source_logits, source_cache = model.run_with_cache(source, names_filter=hooks)
        # The target run is recorded under the attention the patched runs will use (eager for patterns).
        same_attention = [(hooks[0], lambda act, hook: None)] if spec.name == "head_pattern" else []
        with inputs.recording(keys_values=by_position), model.hooks(fwd_hooks=same_attention):
            target_logits = model.hf(input_ids=target, use_cache=False).logits  # no KV cache to replay
    by_position = by_position and inputs.resumable
    clean_logits, corrupt_logits = (source_logits, target_logits) if direction == "denoise" else (target_logits, source_logits)
    name, fn = resolve_metric(metric, read_logits(clean_logits, batch))
    clean_metric = _mean_metric(fn, read_logits(clean_logits, batch)[None], batch).item()
    corrupt_metric = _mean_metric(fn, read_logits(corrupt_logits, batch)[None], batch).item()
    check_baselines(name, clean_metric, corrupt_metric)
    baseline = corrupt_metric if direction == "denoise" else clean_metric
    tokens, fn = narrow(fn, batch)  # patched runs unembed only the logits the metric reads

    wide = torch.promote_types(model.dtype, torch.float32)  # float64 models measure in float64
    values = torch.zeros(len(layers), len(heads), len(positions), dtype=wide)  # squeezed to the result's axes below
    # A position before every prompt's first difference holds the same activation in both runs (it sees
    # the same tokens): patching it changes nothing, so its effect is 0 without a run (IOI: 2 of 14)
    shared = int(differ.min())
    components = [(hi, h, pi, p) for pi, p in enumerate(positions) if p is None or p >= shared
                  for hi, h in enumerate(heads)]
    per_chunk = _variants_per_chunk(model, batch, memory_mb)
    with torch.no_grad(), progress_bar(progress, len(layers) * len(components), f"patching {site}") as bar:
        if by_position and per_position:  # batches of nearby positions, each variant joining at its layer
            every = [(li, hi, h, pi, p) for pi, p in enumerate(positions) if p >= shared for li in range(len(layers))
                     for hi, h in enumerate(heads)]
            # A quarter of the full-run budget: joined batches keep more alive than _variants_per_chunk
            # counts (smollm2, 6 prompts, resid_pre by position: 25 s and a 1.5 GB peak, against 29 s and 2.6 GB).
            for chunk in _position_chunks(every, max(1, per_chunk // 4), int(batch.read_pos.max())):
                chunk.sort(key=lambda c: layers[c[0]])
                patched = _joined_metric(model, inputs, batch, fn, tokens, spec, layers, source_cache, chunk)  # [k]
                for (li, hi, _, pi, _), value in zip(chunk, patched):
                    values[li, hi, pi] = value.item() - baseline
                bar.advance(len(chunk))
        for li, layer in enumerate(layers if not (by_position and per_position) else []):
            src = source_cache[hooks[li]]  # [batch, *site shape]
            for chunk in [components[i : i + per_chunk] for i in range(0, len(components), per_chunk)]:
                if by_position:  # all positions, from the first token where source and target differ
                    heads_mask = variant_mask(spec, src.shape[1:], [(h, None) for _, h, _, _ in chunk])
                    patched = _suffix_metric(model, inputs, batch, fn, tokens, layer, hooks[li], src,
                                             heads_mask[:, 0], differ.repeat(len(chunk)))  # [k]
                else:
                    mask = variant_mask(spec, src.shape[1:], [(h, p) for _, h, _, p in chunk])
                    patched = _patched_metric(model, inputs, batch, fn, tokens, layer, hooks[li], src, mask)  # [k]
                for (hi, _, pi, _), value in zip(chunk, patched):
                    values[li, hi, pi] = value.item() - baseline
                bar.advance(len(chunk))

    if not values.isfinite().all():
        warnings.warn(f"the metric {name} was not finite for {int((~values.isfinite()).sum())} of {values.numel()} "
                      "patched components; those effects are NaN (shown as empty cells)", stacklevel=2)
    axes, labels = spec.axes(model, batch, layers, heads, per_position)
    values = values.reshape([len(labels[a]) for a in axes])
    if per_query_head and spec.kv and model.cfg.n_kv_heads < model.cfg.n_heads:
        group = model.cfg.n_heads // model.cfg.n_kv_heads
        kv_heads = [int(h) for h in labels["head"]]
        values = values.repeat_interleave(group, dim=1)  # [layer, query head, ...]: each reads its group's kv head
        labels = {**labels, "head": [str(kv * group + i) for kv in kv_heads for i in range(group)]}
    return PatchResult(
        values=values, axes=axes, labels=labels, site=site, technique="exact",
        metric=name, direction=direction, clean_metric=clean_metric, corrupt_metric=corrupt_metric,
        model=model.cfg.model_name, n_prompts=len(batch), seconds=time.perf_counter() - start,
    )


def _patched_metric(model, inputs: LayerInputs, batch, fn, tokens, layer: int, hook: str, src: Tensor,
                    mask: Tensor) -> Tensor:
    """The mean metric of k patched variants, run as one batch from `layer` on: [k]."""
    k = mask.shape[0]
    hidden = inputs.resid[layer].repeat(k, 1, 1)  # [k * batch, pos, d_model]
    with model.hooks(fwd_hooks=[(hook, masked_writer(src, mask, len(batch)))]):
        logits = inputs.run(hidden, layer, k, batch.read_pos, tokens=tokens)  # [k, batch, d_vocab or tokens]
    return _mean_metric(fn, logits, batch)


def _suffix_metric(model, inputs: LayerInputs, batch, fn, tokens, layer: int, hook: str, src: Tensor,
                   heads: Tensor, starts: Tensor) -> Tensor:
    """`_patched_metric` for variants that patch every position and leave those before starts
    [k * batch] alone (the source's are the target's there): each row runs from its start on;
    heads [k, *site shape without pos] marks what variant j patches."""
    k = heads.shape[0]
    suffix = inputs.suffix(starts, batch.read_pos)
    hidden = suffix.gather(inputs.resid[layer])  # [k * batch, length, d_model]
    where = heads.repeat_interleave(len(batch), 0).to(src.device)[:, None]  # [k * batch, 1, *rest]
    rows = suffix.gather(src)  # [k * batch, length, *rest]
    with model.hooks(fwd_hooks=[(hook, lambda act, _: torch.where(where, rows.to(act.device), act))]):
        logits = inputs.run(hidden, layer, k, batch.read_pos, suffix, tokens)  # [k, batch, d_vocab or tokens]
    return _mean_metric(fn, logits, batch)


def _joined_metric(model, inputs: LayerInputs, batch, fn, tokens, spec: PatchSite, layers: list[int], source_cache,
                   chunk: list) -> Tensor:
    """Per-position variants (layer index, head index, head, position index, position), in order of
    layer, as one batch: each joins at its layer and runs from its position on, the source's
    activation written there for its head. The mean metric of each, [k]."""
    b = len(batch)
    starts = torch.tensor([p for *_, p in chunk], device=inputs.resid[0].device).repeat_interleave(b)  # [k * batch]
    suffix = inputs.suffix(starts, batch.read_pos)
    joins: dict[int, int] = {}
    for li, *_ in chunk:
        joins[layers[li]] = joins.get(layers[li], 0) + 1
    hooks, done = [], 0
    for layer, count in joins.items():  # the variants joining at `layer` are rows done*b .. (done+count)*b
        src = source_cache[spec.hook_name(layer)]  # [batch, *site shape]
        part = chunk[done:done + count]
        rows = slice(done * b, (done + count) * b)
        first = Suffix(starts[rows], suffix.length, b, suffix.n_pos).first(src)  # [count * batch, *rest]
        where = variant_mask(spec, src.shape[1:], [(h, None) for _, _, h, _, _ in part])[:, 0]
        where = where.repeat_interleave(b, 0).to(src.device)  # [count * batch, *rest]

        def write(act, _, rows=rows, first=first, where=where):
            out = act.clone()  # [present * batch, length, *rest]
            out[rows, 0] = torch.where(where, first.to(act.device), act[rows, 0])
            return out

        hooks.append((spec.hook_name(layer), write))
        done += count
    with model.hooks(fwd_hooks=hooks):
        logits = inputs.run_joined(suffix, joins, batch.read_pos, tokens)  # [k, batch, d_vocab or tokens]
    return _mean_metric(fn, logits, batch)


def _position_chunks(components: list, per_chunk: int, last_read: int, slack: float = 1.25) -> list[list]:
    """Per-position variants in batches of nearby positions: a batch runs as many positions as its
    earliest variant needs (from there to the last read position), so a batch grows only while
    that costs at most `slack` times what its variants need each."""
    chunks, chunk, need = [], [], 0
    for c in components:  # in order of position
        length = max(1, last_read - c[-1] + 1)  # positions this variant runs (its position is last)
        longest = max(1, last_read - chunk[0][-1] + 1) if chunk else length
        if chunk and (len(chunk) >= per_chunk or (len(chunk) + 1) * longest > slack * (need + length)):
            chunks.append(chunk)
            chunk, need = [], 0
        chunk.append(c)
        need += length
    return chunks + [chunk] if chunk else chunks


def _first_difference(source: Tensor, target: Tensor) -> Tensor:
    """Each prompt's first position where source and target tokens differ (its length if none): [batch]."""
    same = (source == target).int().cumprod(1)  # [batch, pos]: 1 while the prefix agrees
    return same.sum(1)


def _mean_metric(fn: Metric, logits: Tensor, batch: ContrastiveBatch) -> Tensor:
    """fn per variant ([batch, d_vocab] -> [batch] or a scalar), averaged over prompts: [k]."""
    return torch.stack([widen(fn(variant, batch)).mean() for variant in logits])


def masked_writer(src: Tensor, mask: Tensor, batch_size: int):
    """A hook for k variants stacked on the batch axis: variant j takes the source's activation
    `src` [batch, *site shape] where mask[j] is set, and keeps its own elsewhere."""
    k = mask.shape[0]

    def write(act: Tensor, _) -> Tensor:
        rows = act.reshape(k, batch_size, *act.shape[1:])  # [k, batch, *site shape]
        where = mask.to(act.device)[:, None]
        return torch.where(where, src.to(act.device)[None], rows).reshape(act.shape)

    return write


def variant_mask(spec: PatchSite, shape: torch.Size, components: list[tuple[int | None, int | None]]) -> Tensor:
    """[k, *shape'] booleans: row j marks component j's head and position (all of a missing one)."""
    mask_shape = [1] * len(shape)
    if spec.per_head:
        mask_shape[spec.head_dim] = shape[spec.head_dim]
    if components[0][1] is not None:
        mask_shape[spec.pos_dim] = shape[spec.pos_dim]
    mask = torch.zeros(len(components), *mask_shape, dtype=torch.bool)
    for j, (head, pos) in enumerate(components):
        index = [j] + [slice(None)] * len(shape)
        if head is not None:
            index[1 + spec.head_dim] = head
        if pos is not None:
            index[1 + spec.pos_dim] = pos
        mask[tuple(index)] = True
    return mask


def _variants_per_chunk(model: HookedModel, batch: ContrastiveBatch, memory_mb: int) -> int:
    """How many patched variants fit in the memory budget at once (a rough, safe estimate)."""
    c, (b, n_pos) = model.cfg, batch.clean.shape
    floats = b * n_pos * (8 * c.d_model + 3 * c.d_mlp + 2 * c.n_heads * n_pos) + 2 * b * c.d_vocab
    return max(1, memory_mb * 2**20 // (4 * floats))
