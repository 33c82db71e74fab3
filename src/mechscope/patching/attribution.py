"""Attribution patching (AtP, Nanda 2022) and AtP* (Kramar, Lieberum, Shah, Nanda 2024).

AtP estimates every component's patching effect at once by a first-order Taylor expansion around
the run being patched into (the target):

    effect(n) ~ (a_source(n) - a_target(n)) . dM/da(n)   (gradient on the target run)

summed over the component's elements, with M the metric averaged over prompts. It is accurate for
small changes (head outputs) and can fail for large ones (the residual stream, early MLPs) and for
queries and keys of saturated attention. AtP* fixes two failure modes:

- QK fix: for `head_q` and `head_k`, the attention pattern that the patched query (key) gives is
  computed exactly, by running that layer again with the source's queries (keys), and only the
  step from the pattern on is linear: effect ~ (A_patched - A_target) . dM/dA. Heads are
  independent, so one run of a layer serves all its heads (and, for queries, all positions).
- GradDrop: the backward pass is run once more per layer l with the gradient through layer l's
  writes to the residual stream (attention and MLP outputs) set to zero, giving estimates c_l(n);
  the score (1 / (L - 1)) * sum_l |c_l(n)| exposes components whose direct and indirect effects
  cancel in plain AtP. It is a magnitude for ranking, kept in `result.extra["graddrop"]`; `values`
  keeps the signed estimate.

Cost, in plain forwards of the batch (a backward costs about two):
- atp: one forward on the source, one forward and one backward on the target, for every site at
  once: about 4.
- atp*: atp plus, per q/k site, one run of each layer (about 1 forward; per-position keys: one
  per key position), plus GradDrop's L extra backward passes (about 2 L).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Sequence

import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.metrics import Metric, check_baselines, read_logits, resolve_metric, widen
from mechscope.models.hooked import HookedModel, technique
from mechscope.patching.exact import masked_writer, variant_mask
from mechscope.patching.result import PatchResult
from mechscope.patching.resume import LayerInputs
from mechscope.patching.sites import PatchSite, patch_site
from mechscope.tasks.batch import ContrastiveBatch

QK_SITES = ("head_q", "head_k")


@technique
def attribution_patch(
    model: HookedModel,
    batch: ContrastiveBatch,
    *,
    sites: Sequence[str] = ("head_z",),
    metric: str | Metric = "logit_diff",
    direction: str = "denoise",
    per_position: bool = False,
    method: str = "atp",
    graddrop: bool = True,
    graddrop_layers: bool = False,
) -> dict[str, PatchResult]:
    """Estimate the effect of patching every component of each site, from the same passes.

    Returns {site: PatchResult} with the axes and labels `activation_patch` gives, so the two
    compare cell by cell; `technique` is "atp" or "atp*". `graddrop` (atp* only) adds GradDrop;
    `graddrop_layers` also keeps the signed estimate of each dropped layer, [layer dropped, ...], in
    `extra["graddrop_layers"]` (means over prompts, so runs on parts of a batch combine exactly).
    """
    start = time.perf_counter()
    if method not in ("atp", "atp*"):
        raise InputError(f"method must be 'atp' or 'atp*', not {method!r}")
    given = {patch_site(s).name: s for s in dict.fromkeys(sites)}  # results are keyed by the names given
    specs = [patch_site(s) for s in given.values()]
    n_layers = model.cfg.n_layers
    star = method == "atp*"
    qk = star and any(s.name in QK_SITES for s in specs)
    drops = [None] + (list(range(n_layers)) if star and graddrop and n_layers > 1 else [])
    names = list(dict.fromkeys(s.hook_name(l) for s in specs for l in range(n_layers)))
    patterns = [f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)] if qk else []

    source, target = batch.source_and_target(direction)
    with torch.no_grad():
        source_logits, source_cache = model.run_with_cache(source, names_filter=names)
    inputs = LayerInputs(model, len(batch)) if qk else None
    run = _target_pass(model, batch, target, names + patterns, metric, direction, source_logits, drops, inputs)
    source_metric = _metric(run["fn"], read_logits(source_logits, batch), batch)
    clean_metric, corrupt_metric = (
        (source_metric, run["metric"]) if direction == "denoise" else (run["metric"], source_metric)
    )
    check_baselines(run["name"], clean_metric, corrupt_metric)

    results = {}
    for spec in specs:
        layers, heads = spec.components(model, None, None)
        per_drop = []  # [drop] -> [layer, ...]
        fixed = _qk_fixed(model, inputs, spec, source_cache, run, drops, per_position) if star and spec.name in QK_SITES else None
        for d in drops:
            if fixed is not None:
                per_drop.append(fixed[d])
                continue
            grads = run["grads"][d]
            per_drop.append(torch.stack([
                _linear_effect(spec, source_cache[spec.hook_name(l)] - run["acts"][spec.hook_name(l)],
                               grads[spec.hook_name(l)], per_position)
                for l in range(n_layers)
            ]))
        extra = {"passes": _passes(spec, star, len(drops), per_position)}
        if len(drops) > 1:
            extra["graddrop"] = (torch.stack([c.abs() for c in per_drop[1:]]).sum(0) / (n_layers - 1)).tolist()
            if graddrop_layers:
                extra["graddrop_layers"] = widen(torch.stack(per_drop[1:])).tolist()
        axes, labels = spec.axes(model, batch, layers, heads, per_position)
        results[given[spec.name]] = PatchResult(
            values=widen(per_drop[0].reshape([len(labels[a]) for a in axes])), axes=axes, labels=labels,
            site=spec.name, technique=method, metric=run["name"], direction=direction,
            clean_metric=clean_metric, corrupt_metric=corrupt_metric, model=model.cfg.model_name,
            n_prompts=len(batch), seconds=time.perf_counter() - start, extra=extra,
        )
    return results


def _metric(fn: Metric, logits: Tensor, batch: ContrastiveBatch) -> float:
    return widen(fn(logits, batch)).mean().item()


def _target_pass(model, batch, target, names, metric, direction, source_logits, drops, inputs) -> dict:
    """Forward on the target with every site's activation kept, then one backward per entry of
    `drops` (None: plain; l: gradient through layer l's residual writes dropped)."""
    acts: dict[str, Tensor] = {}
    grads: dict = {d: {} for d in drops}
    state = {"drop": None}
    leaf = {}

    def make_leaf(act, hook):  # gradients flow to the activations only, never into parameters
        leaf["x"] = act.detach().requires_grad_(True)
        return leaf["x"]

    def keep_act(act, hook):
        acts[hook.name] = act.detach()

    def keep_grad(grad, hook):
        grads[state["drop"]][hook.name] = grad.detach()

    def drop(grad, hook):
        return torch.zeros_like(grad) if hook.layer == state["drop"] else None

    fwd = [("hook_embed", make_leaf)] + [(n, keep_act) for n in names]
    bwd = [(n, keep_grad) for n in names]
    if len(drops) > 1:
        bwd += [(f"blocks.{l}.hook_{w}_out", drop) for l in range(model.cfg.n_layers) for w in ("attn", "mlp")]
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd), (inputs.recording() if inputs else nullcontext()):
        logits = model.hf(input_ids=target, use_cache=False).logits  # [batch, pos, d_vocab]
        read = read_logits(logits, batch)  # [batch, d_vocab]
        clean_read = read_logits(source_logits, batch) if direction == "denoise" else read.detach()
        name, fn = resolve_metric(metric, clean_read)
        value = widen(fn(read, batch)).mean()
        for i, d in enumerate(drops):
            state["drop"] = d
            torch.autograd.grad(value, [leaf["x"]], retain_graph=i < len(drops) - 1)
    return {"acts": acts, "grads": grads, "name": name, "fn": fn, "metric": value.item()}


def _linear_effect(spec: PatchSite, delta: Tensor, grad: Tensor, per_position: bool) -> Tensor:
    """sum over batch and each component's elements of delta * grad: [head, pos], [head], [pos] or []."""
    prod = (widen(delta) * widen(grad)).sum(0)  # [*site shape]
    keep = [d for d in (spec.head_dim, spec.pos_dim) if d is not None]
    prod = prod.sum([d for d in range(prod.ndim) if d not in keep])  # [head, pos] in site order
    if spec.per_head and spec.head_dim > spec.pos_dim:
        prod = prod.T  # [head, pos]
    return prod if per_position else prod.sum(-1)


def _qk_fixed(model, inputs: LayerInputs, spec: PatchSite, source_cache, run, drops, per_position) -> dict:
    """AtP* for queries and keys: exact patterns, linear from there. {drop: [layer, head(, pos)]}."""
    cfg = model.cfg
    group = cfg.n_heads // cfg.n_kv_heads
    out = {d: [] for d in drops}
    n_pos = next(iter(run["acts"].values())).shape[1]
    for layer in range(cfg.n_layers):
        pattern = run["acts"][f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q_pos, k_pos]
        src = source_cache[spec.hook_name(layer)]  # [batch, pos, head or kv_head, d_head]
        per_key = spec.name == "head_k" and per_position
        variants = [(None, p) for p in range(n_pos)] if per_key else [(None, None)]
        mask = variant_mask(spec, src.shape[1:], variants)
        patched = _patterns_with(model, inputs, layer, spec.hook_name(layer), src, mask)  # [k, batch, head, q, k]
        delta = patched - pattern[None]
        for d in drops:
            grad = run["grads"][d][f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q_pos, k_pos]
            prod = (delta * grad[None]).sum(-1).sum(1)  # [k, head, q_pos]
            if spec.name == "head_q":
                effect = prod[0] if per_position else prod[0].sum(-1)  # [head, pos] or [head]
            else:
                per_kv = prod.sum(-1).reshape(len(variants), cfg.n_kv_heads, group).sum(-1)  # [k, kv_head]
                effect = per_kv.T if per_key else per_kv[0]  # [kv_head, pos] or [kv_head]
            out[d].append(effect)
    return {d: torch.stack(v) for d, v in out.items()}


def _patterns_with(model, inputs: LayerInputs, layer: int, hook: str, src: Tensor, mask: Tensor) -> Tensor:
    """Layer `layer`'s attention patterns, [k, batch, head, q_pos, k_pos], when variant j writes the
    source's activation where mask[j] is set."""
    k, b = mask.shape[0], inputs.batch_size
    seen = {}

    def read(act, _):
        seen["pattern"] = act.reshape(k, b, *act.shape[1:])

    hidden = inputs.resid[layer].repeat(k, 1, 1)  # [k * batch, pos, d_model]
    hooks = [(hook, masked_writer(src, mask, b)), (f"blocks.{layer}.attn.hook_pattern", read)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        inputs.run_layers(hidden, layer, layer + 1, k)
    return seen["pattern"]


def _passes(spec: PatchSite, star: bool, backwards: int, per_position: bool) -> str:
    extra = ""
    if star and spec.name in QK_SITES:
        extra = " + one run per layer" + (" per key position" if spec.name == "head_k" and per_position else "")
    return f"2 forwards + {backwards} backward{'s' if backwards > 1 else ''}{extra}"
