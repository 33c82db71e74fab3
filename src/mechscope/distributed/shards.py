"""Shards of a prompt set, and the exact combination of what a technique found on each.

A technique whose result is a mean over prompts (every metric is one value per prompt, averaged)
gives on the whole batch the mean of its shards' results weighted by their prompts:

    whole = sum_i n_i * shard_i / sum_i n_i

That holds for the effects of exact, attribution and path patching, their clean and corrupt
baselines, AtP*'s per-layer GradDrop estimates (GradDrop itself, a sum of their magnitudes, is
formed again from the combined ones), and EAP, EAP-IG and exact edge scores. Probe activations are
rows, not means: the shards' rows are concatenated in order, prompts renumbered in the whole set. It does not hold for
what depends on every prompt at once: mean ablation (the mean is the batch's), ACDC (each removal
is decided on the whole batch), a recorded `PathRuns` or `Evaluator`; those are refused before any
work.
"""

from __future__ import annotations

import dataclasses

import torch

from mechscope.errors import InputError
from mechscope.patching.result import PatchResult
from mechscope.result import Result
from mechscope.tasks.batch import ContrastiveBatch

PER_PROMPT_KWARGS = ("at",)  # keyword arguments with one entry per prompt (path_patch's positions), split too
WHOLE_BATCH_KWARGS = {
    "runs": "a PathRuns records the whole batch; leave runs out",
    "evaluator": "an Evaluator records the whole batch; leave evaluator out",
    "candidates": "ACDC decides on the whole batch",
}


def check_shardable(kwargs: dict) -> None:
    """An InputError for arguments whose result is not a mean over prompts (before any work)."""
    for key, why in WHOLE_BATCH_KWARGS.items():
        if kwargs.get(key) is not None:
            raise InputError(f"{key}= cannot be split over workers: {why}")
    if kwargs.get("method") == "acdc":
        raise InputError("ACDC cannot be split over workers: each removal is decided on the whole batch; "
                         "run it in one process, or split method='eap-ig' or 'exact'")
    if kwargs.get("ablation") == "mean":
        raise InputError("mean ablation cannot be split over workers: the mean is over the whole batch; "
                         "use ablation='corrupt' or 'zero', or run it in one process")


def split(batch, shards: int) -> list[tuple[int, int]]:
    """(start, stop) of `shards` contiguous parts of a batch (or any sequence of prompts), sizes
    differing by at most one."""
    if not isinstance(shards, int) or shards < 1:
        raise InputError(f"shards must be a positive integer, not {shards!r}")
    shards = min(shards, len(batch))
    bounds = [len(batch) * i // shards for i in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def shard_kwargs(kwargs: dict, start: int, stop: int, n_prompts: int) -> dict:
    """The keyword arguments of one shard: those with an entry per prompt cut to its prompts."""
    out = dict(kwargs)
    for key in PER_PROMPT_KWARGS:
        value = out.get(key)
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == n_prompts:
            out[key] = value[start:stop]
    return out


def combine(results: list, sizes: list[int], batch: ContrastiveBatch, seconds: float, extra: dict):
    """The whole batch's result from its shards' (in shard order), `sizes` prompts each."""
    first = results[0]
    if isinstance(first, dict):  # attribution_patch: {site: PatchResult}
        return {site: combine([r[site] for r in results], sizes, batch, seconds, extra) for site in first}
    if not isinstance(first, Result):
        raise InputError(f"the technique returned {type(first).__name__}; a split run combines results that are "
                         "means over prompts (PatchResult, EdgeScores, or attribution's dict of them)")
    for r in results[1:]:
        if type(r) is not type(first) or r.axes != first.axes or r.values.shape != first.values.shape:
            raise InputError("the shards' results do not line up (axes or shapes differ); run it in one process")
    weights = [n / sum(sizes) for n in sizes]
    mean = lambda values: sum(w * torch.as_tensor(v, dtype=torch.float64) for w, v in zip(weights, values))  # noqa: E731
    values = mean([r.values for r in results]).to(first.values.dtype)
    labels = dict(first.labels)
    if "pos" in labels and not batch.equal_lengths:  # the whole batch labels positions by number alone
        labels["pos"] = [str(i) for i in range(len(labels["pos"]))]
    merged = {**first.extra, **extra}
    if "graddrop_layers" in first.extra:  # AtP*: GradDrop again, from the combined per-layer estimates
        layers = mean([r.extra["graddrop_layers"] for r in results])  # [layer dropped, ...]
        merged["graddrop_layers"] = layers.tolist()
        merged["graddrop"] = (layers.abs().sum(0) / (layers.shape[0] - 1)).tolist()  # as attribution.py
    for key in ("clean_metric", "empty_metric"):  # EdgeScores' baselines
        if key in first.extra:
            merged[key] = float(mean([r.extra[key] for r in results]))
    fields = {"values": values, "labels": labels, "n_prompts": sum(sizes), "seconds": seconds, "extra": merged}
    if isinstance(first, PatchResult):
        fields["clean_metric"] = float(mean([r.clean_metric for r in results]))
        fields["corrupt_metric"] = float(mean([r.corrupt_metric for r in results]))
    return dataclasses.replace(first, **fields)


def collect_part(model, tokens, *, sites, positions=None, **kwargs) -> dict:
    """probes.collect on one shard of prompts, its rows returned as plain tensors (a worker's
    temporary shards on disk would not reach the caller)."""
    from mechscope.probes.collect import collect

    if positions is not None and not any(len(p) for p in positions):  # no row chosen in this shard
        return {"values": {}, "prompt": torch.zeros(0, dtype=torch.long), "position": torch.zeros(0, dtype=torch.long),
                "shapes": {}, "sites": None}
    acts = collect(model, tokens, sites, positions=positions, **kwargs)
    try:
        return {"values": {s: acts[s] for s in acts.sites}, "prompt": acts.prompt, "position": acts.position,
                "shapes": acts.shapes, "sites": acts.sites}
    finally:
        acts.close()


def combine_rows(parts: list[dict], bounds: list[tuple[int, int]]):
    """The Activations of the whole prompt set from its shards' rows: the same rows in the same order
    (prompt, then position), prompts numbered in the whole set."""
    from mechscope.probes.collect import Activations

    full = [p for p in parts if p["sites"] is not None]
    if not full:
        raise InputError("no positions chosen: every prompt's list is empty")
    sites, shapes = full[0]["sites"], full[0]["shapes"]
    memory = {s: [p["values"][s] for p in full] for s in sites}
    prompt = torch.cat([p["prompt"] + start for p, (start, _) in zip(parts, bounds)])
    position = torch.cat([p["position"] for p in parts])
    return Activations(sites, prompt, position, shapes, memory, None)
