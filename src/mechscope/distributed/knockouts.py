"""Knockouts of a batch split over a cluster's workers: each worker keeps the `Knockouts` of its
own shard (its recorded runs stay there between calls), and every logit difference is the
prompt-weighted mean of the shards'. The same interface as `analysis.circuit.Knockouts`, so
`faithfulness`, `completeness`, `minimality` and the IOI study take it as `knockouts=`.

The mean ablation is exact per shard: each prompt's mean comes from the reference prompts of its
template, which every shard is given whole (the whole batch when no reference is given, as in one
process), so no mean depends on how the batch is cut.

1. Cut the batch into one shard per worker; worker i builds Knockouts(model, shard i, reference).
2. `logit_diffs(keeps)`: every worker answers for its shard; the answers are averaged, weighted by
   the shards' prompts. `remember(keep)` is sent to every worker and logged.
3. A worker that dies is replaced: its Knockouts is built again, the logged `remember` calls are
   replayed, and the call runs again.
"""

from __future__ import annotations

import uuid
from typing import Iterable, Sequence

import torch

from mechscope.analysis.circuit import Head, Knockouts
from mechscope.errors import InputError


class ShardedKnockouts:
    """`cluster.knockouts(batch, reference=...)`: Knockouts over the cluster's workers."""

    def __init__(self, cluster, batch, *, reference=None):
        from mechscope.distributed.shards import split

        self.cluster, self.batch = cluster, batch
        self.bounds = split(batch, cluster.workers)  # shard i lives on worker i
        self._key = uuid.uuid4().hex
        self._reference = batch if reference is None else reference  # whole, as one process's default
        self._log: list[set[Head]] = []  # remember() calls, replayed on a replacement worker
        self._weights = [(b - a) / len(batch) for a, b in self.bounds]
        self._each([("build", ()) for _ in self.bounds])
        self.model_logit_diff = self._mean(self._each([("get", ("model_logit_diff",))] * len(self.bounds)))
        self.heads: set[Head] = self._each([("get", ("heads",))])[0]
        self._means = None

    @property
    def means(self) -> dict[str, torch.Tensor]:
        """Each prompt's mean head outputs, [batch, pos, head, d_head] per layer (the shards' joined)."""
        if self._means is None:
            parts = self._each([("get", ("means",))] * len(self.bounds))
            self._means = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        return self._means

    def check(self, heads: Iterable[Head]) -> None:
        bad = sorted(set(heads) - self.heads)
        if bad:
            raise InputError(f"heads {bad} are not in this model")

    def remember(self, keep: Iterable[Head]) -> bool:
        keep = set(keep)
        self.check(keep)
        self._log.append(keep)
        return any(self._each([("call", ("remember", keep))] * len(self.bounds)))

    def forget(self, keep: Iterable[Head]) -> None:
        keep = set(keep)
        self._log = [k for k in self._log if k != keep]
        self._each([("call", ("forget", keep))] * len(self.bounds))

    def logit_diffs(self, keeps: Sequence[set[Head]]) -> list[float]:
        parts = self._each([("call", ("logit_diffs", list(keeps)))] * len(self.bounds))  # [shard][keep]
        return [self._mean([p[j] for p in parts]) for j in range(len(keeps))]

    def _mean(self, values: list[float]) -> float:
        return float(sum(w * v for w, v in zip(self._weights, values)))

    def _each(self, calls: list[tuple[str, tuple]]) -> list:
        """calls[i] on worker i, together; a dead worker replaced, its shard rebuilt and replayed."""
        ray = self.cluster.ray
        refs = [self._send(i, what, args) for i, (what, args) in enumerate(calls)]
        out = []
        for i, ref in enumerate(refs):
            for attempt in range(self.cluster.retries + 1):
                try:
                    out.append(self.cluster._get(ref))
                    break
                except ray.exceptions.RayActorError:
                    if attempt == self.cluster.retries:
                        raise
                    self.cluster._replace(i)
                    self.cluster._get(self._send(i, "build", ()))
                    for keep in self._log:
                        self.cluster._get(self._send(i, "call", ("remember", keep)))
                    ref = self._send(i, *calls[i])
        return out

    def _send(self, i: int, what: str, args: tuple):
        actor = self.cluster._actors[i]
        if what == "build":
            a, b = self.bounds[i]
            return actor.keep.remote(self._key, Knockouts, (self.batch.rows(a, b),), {"reference": self._reference})
        if what == "get":
            return actor.attribute.remote(self._key, *args)
        return actor.call.remote(self._key, *args)
