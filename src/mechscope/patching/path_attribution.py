"""Path attribution: the first-order estimate of every sender's path-patching effect, from one
forward and one backward of the target run and one of the frozen run, whatever the number of senders.

Path patching (patching/path.py) sets sender s to its source value z_s' in a run where every other
head is frozen to its target value z, and asks how the metric changes when the receivers' inputs
(or the final residual stream) take what that run gives them. Along the line z_s + a (z_s' - z_s),
the effect's derivative at a = 0 is

    (z_s' - z_s) . J_s^T g

where g = d metric / d (receiver inputs) on the target run and J_s = d (receiver inputs) / d z_s
through the frozen run (the residual stream, the MLPs and the norms; attention frozen). So:

1. Target run with the receivers' inputs (hook_q / hook_k / hook_v of the receiver heads at the
   patched positions) as leaves; backward from the mean metric: g. (Receivers "logits": skipped;
   the frozen run's own metric is the function.)
2. Frozen run: every hook_z before the last receiver returns its target value plus a zero offset
   that requires grad, so that a change reaches later layers only through the residual stream and
   the MLPs; L = sum over receivers of <g, receiver input>; backward: dL / d offset = J^T g for
   every sender at once.
3. Estimate of sender (l, h) = sum over prompts, positions and d_head of (z' - z) * dL/d offset
   (g already holds the mean over prompts).

Like AtP for nodes, this is exact for a linear path and only an estimate otherwise (attention
saturation, norms): rank with it, then path-patch exactly what it ranks first (`mechscope ioi --screen
atp` does, and checks a random sample of the rest).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.metrics import Metric, at_positions
from mechscope.models.hooked import HookedModel, technique
from mechscope.patching.exact import _mean_metric
from mechscope.patching.path import PathRuns, check_receivers, runs_for
from mechscope.patching.result import PatchResult
from mechscope.tasks.batch import ContrastiveBatch


@technique
def path_attribution(
    model: HookedModel,
    batch: ContrastiveBatch,
    *,
    receivers: str | Sequence[tuple[int, int]] = "logits",
    receiver_input: str = "q",
    at: str | Tensor = "all",
    metric: str | Metric = "logit_diff",
    direction: str = "noise",
    runs: PathRuns | None = None,
) -> PatchResult:
    """The gradient estimate of `path_patch(model, batch, receivers=..., receiver_input=..., at=...)`
    for every sender head before the last receiver: same arguments, same axes, one pass."""
    start = time.perf_counter()
    cfg = model.cfg
    to_logits = receivers == "logits"
    receivers = check_receivers(model, batch, receivers, receiver_input, at)
    last = cfg.n_layers if to_logits else max(layer for layer, _ in receivers)
    if last == 0:
        raise InputError("no head sits before the receivers: choose receivers in a later layer")
    runs = runs_for(model, batch, direction, runs)
    _, target = batch.source_and_target(direction)
    name, fn, _, clean_metric, corrupt_metric = runs.metric(metric)

    recv_names = {} if to_logits else {
        f"blocks.{l}.attn.hook_{receiver_input}": [h for rl, h in receivers if rl == l] for l in {l for l, _ in receivers}}
    where = _where(model, batch, at)
    with torch.enable_grad():
        grads = {} if to_logits else _receiver_grads(model, batch, target, fn, recv_names, where)
        offset_grads = _frozen_grads(model, batch, target, fn, last, recv_names, grads, to_logits)

    wide = torch.promote_types(model.dtype, torch.float32)
    values = torch.zeros(last, cfg.n_heads, dtype=wide)
    for l in range(last):
        z = f"blocks.{l}.attn.hook_z"
        delta = runs.source_cache[z] - runs.target_cache[z]  # [batch, pos, head, d_head]
        values[l] = (delta.to(wide) * offset_grads[l].to(wide)).sum((0, 1, 3)).cpu()  # [head]
    labels = {"layer": [str(l) for l in range(last)], "head": [str(h) for h in range(cfg.n_heads)]}
    return PatchResult(
        values=values, axes=("layer", "head"), labels=labels, site="head_z", technique="path attribution",
        metric=name, direction=direction, clean_metric=clean_metric, corrupt_metric=corrupt_metric, model=cfg.model_name,
        n_prompts=len(batch), seconds=time.perf_counter() - start,
        extra={"receivers": "logits" if to_logits else [f"{l}.{h}" for l, h in receivers],
               "receiver_input": None if to_logits else receiver_input,
               "at": at.tolist() if isinstance(at, Tensor) else at},
    )


def _where(model: HookedModel, batch: ContrastiveBatch, at) -> Tensor | None:
    """Which positions the receivers are patched at: [batch, pos] booleans, or None for all."""
    if isinstance(at, str) and at == "all":
        return None
    pos = (batch.read_pos if isinstance(at, str) else at).to(model.device)  # [batch]
    return torch.arange(batch.clean.shape[1], device=model.device)[None] == pos[:, None]  # [batch, pos]


def _receiver_grads(model, batch, target, fn, recv_names: dict[str, list[int]], where) -> dict[str, Tensor]:
    """Step 1: d mean metric / d receiver input on the target run, at the receiver heads and the patched
    positions only (those that step 2 of path patching overwrites; the rest of each input is computed
    as usual, so a receiver's change still reaches later receivers through other heads):
    {hook name: [batch, pos, head, d_head]}."""
    leaves = {}

    def leaf(act, hook):
        mask = torch.zeros_like(act, dtype=torch.bool)  # [batch, pos, head, d_head]
        mask[:, :, recv_names[hook.name]] = True
        if where is not None:
            mask &= where[:, :, None, None]
        leaves[hook.name] = (act.detach().requires_grad_(True), mask)
        return torch.where(mask, leaves[hook.name][0], act)

    with model.hooks(fwd_hooks=[(n, leaf) for n in recv_names]):
        loss = _read_metric(model, batch, target, fn)
    names = list(recv_names)
    grads = torch.autograd.grad(loss, [leaves[n][0] for n in names])  # no weight gradients
    return {n: torch.where(leaves[n][1], grad, 0) for n, grad in zip(names, grads)}


def _frozen_grads(model, batch, target, fn, last, recv_names, grads, to_logits) -> list[Tensor]:
    """Steps 2: the frozen run's d L / d offset for every layer before the last receiver,
    [batch, pos, head, d_head] each."""
    offsets = []

    def freeze(act, hook):
        offsets.append(torch.zeros_like(act, requires_grad=True))
        return act.detach() + offsets[-1]

    reached = {}

    def keep(act, hook):
        reached[hook.name] = act

    hooks = [(f"blocks.{l}.attn.hook_z", freeze) for l in range(last)] + [(n, keep) for n in recv_names]
    with model.hooks(fwd_hooks=hooks):
        if to_logits:
            loss = _read_metric(model, batch, target, fn)
        else:
            model(target, stop_at_layer=last + 1)  # the last receiver's layer reads its inputs
            loss = sum((grads[n] * reached[n]).sum() for n in recv_names)
    return list(torch.autograd.grad(loss, offsets, allow_unused=True, materialize_grads=True))


def _read_metric(model, batch, target, fn) -> Tensor:
    """The mean metric of a run of `target`, unembedding only the read positions (the logits of
    every position, and their gradients, would be the largest tensors of the backward pass)."""
    final = model(target, stop_at_layer=model.cfg.n_layers)  # [batch, pos, d_model]
    logits = model.logits_from_resid(at_positions(final, batch.read_pos))  # [batch, d_vocab]
    return _mean_metric(fn, logits[None], batch).sum()
