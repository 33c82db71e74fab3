"""How good is a circuit: the metric with every edge outside it ablated, and its faithfulness.

    faithfulness(C) = (m(C) - m(empty)) / (m(M) - m(empty))

m(M) is the clean model, m(empty) the run with every edge of the graph ablated (for corrupt
ablation on the whole graph: the corrupt run). A curve evaluates circuits of growing size in one
batch of edge-patched runs; its area is taken against log(size) from 1 edge to all of them, so a
circuit that is faithful with few edges scores near 1.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from mechscope.discovery.edges import EdgePatcher
from mechscope.discovery.graph import Graph
from mechscope.discovery.scores import Circuit, EdgeScores
from mechscope.errors import InputError
from mechscope.metrics import Metric, check_baselines, resolve_metric, widen
from mechscope.models.hooked import HookedModel, technique
from mechscope.tasks.batch import ContrastiveBatch


class Evaluator:
    """One batch, recorded once; `metric(masks)` is the mean metric of each edge-ablated variant."""

    def __init__(self, model: HookedModel, batch: ContrastiveBatch, graph: Graph, *, ablation: str = "corrupt",
                 metric: str | Metric = "logit_diff", memory_mb: int = 2048, gradients: bool = False):
        """gradients: make the clean recording EAP's gradient pass too (`EdgePatcher(gradients=)`), so
        that `discover(..., method="eap" or "eap-ig", evaluator=this)` runs one forward fewer."""
        self.patcher = EdgePatcher(model, graph, batch, ablation=ablation, memory_mb=memory_mb,
                                   gradients=metric if gradients else None)
        self.graph = graph
        with torch.no_grad():
            clean_read = model.logits_from_resid(self.patcher.clean_final)  # [batch, d_vocab]
        self.metric_name, self.fn = resolve_metric(metric, clean_read)
        self.fn = self.patcher.clean_fn or self.fn  # (one function object: EAP checks it is the same metric)
        self.clean = self._mean(clean_read[None]).item()
        p = self.patcher
        if p.ablated_final is not None and p.full_graph:  # every edge corrupted is the corrupt run
            with torch.no_grad():
                self.empty = self._mean(model.logits_from_resid(p.ablated_final)[None]).item()
        else:
            self.empty = self.metric(torch.ones(1, graph.n_edges, dtype=torch.bool)).item()
        check_baselines(self.metric_name, self.clean, self.empty)

    def _mean(self, read: Tensor) -> Tensor:
        return widen(self.fn(read, self.patcher.batch)).mean(-1)  # [k]

    def metric(self, ablated: Tensor, reference=None) -> Tensor:
        """ablated [k, n_edges] (1 = ablated) -> mean metric [k], on the CPU (`EdgePatcher.run`'s
        `reference`: where the rows resume)."""
        with torch.no_grad():
            return self._mean(self.patcher.run(ablated, reference)).cpu()

    def faithfulness(self, value: Tensor | float) -> Tensor | float:
        return (value - self.empty) / (self.clean - self.empty)

    def evaluate(self, circuit: Circuit) -> dict:
        if circuit.graph.to_spec() != self.graph.to_spec():
            raise InputError("this circuit belongs to another graph; evaluate it with the graph it was found on")
        value = self.metric((~circuit.mask)[None])[0].item()
        return {"metric": value, "clean": self.clean, "empty": self.empty, "faithfulness": self.faithfulness(value),
                "n_edges": len(circuit), "n_edges_total": self.graph.n_edges}

    def curve(self, scores: EdgeScores, sizes: Sequence[int] | None = None, *, greedy: bool = False,
              signed: bool = False) -> dict:
        """Faithfulness of the circuits of the given sizes (default: 1, 2, 5, 10, .. all edges)."""
        n = self.graph.n_edges
        sizes = default_sizes(n) if sizes is None else sorted({int(s) for s in sizes})
        circuits = [scores.circuit(edges=s, greedy=greedy, signed=signed) for s in sizes]
        values = self.metric(torch.stack([~c.mask for c in circuits]))
        faith = [self.faithfulness(v) for v in values.tolist()]
        return {"sizes": sizes, "edges_kept": [len(c) for c in circuits], "metric": values.tolist(),
                "faithfulness": faith, "area": curve_area(sizes, faith, n), "clean": self.clean, "empty": self.empty}

    def smallest(self, scores: EdgeScores, target: float, curve: dict, *, signed: bool = False
                 ) -> tuple[Circuit, float] | None:
        """The smallest top-N circuit whose faithfulness reaches `target`, by bisection between the
        curve's last size below the target and its first size at or above it (None if none is); the
        curve must have been measured with the same `signed`."""
        sizes, faith = curve["sizes"], curve["faithfulness"]
        above = [i for i, f in enumerate(faith) if f >= target]
        if not above:
            return None
        hi = sizes[above[0]]
        lo = sizes[above[0] - 1] if above[0] > 0 else 0
        best = (hi, faith[above[0]])
        while hi - lo > 1:
            mid = (lo + hi) // 2
            f = self.faithfulness(self.metric((~scores.circuit(edges=mid, signed=signed).mask)[None])[0].item())
            if f >= target:
                hi, best = mid, (mid, f)
            else:
                lo = mid
        return scores.circuit(edges=best[0], signed=signed), best[1]


@technique
def evaluate(model: HookedModel, batch: ContrastiveBatch, circuit: Circuit, *, ablation: str = "corrupt",
             metric: str | Metric = "logit_diff") -> dict:
    """The metric with every edge outside `circuit` ablated, the clean and empty baselines, and the
    normalized faithfulness."""
    return Evaluator(model, batch, circuit.graph, ablation=ablation, metric=metric).evaluate(circuit)


def default_sizes(n: int) -> list[int]:
    sizes, base = [], 1
    while base < n:
        sizes += [s for s in (base, 2 * base, 5 * base) if s < n]
        base *= 10
    return sizes + [n]


def curve_area(sizes: Sequence[int], faith: Sequence[float], n: int) -> float:
    """Trapezoid area under faithfulness against log(size) / log(n), over the sizes measured."""
    if n <= 1 or len(sizes) < 2:
        return float(faith[0]) if faith else float("nan")
    xs = [math.log(max(s, 1)) / math.log(n) for s in sizes]
    return sum((x1 - x0) * (f0 + f1) / 2 for x0, x1, f0, f1 in zip(xs, xs[1:], faith, faith[1:])) / (xs[-1] - xs[0])
