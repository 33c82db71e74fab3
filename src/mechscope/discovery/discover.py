"""One signature for every discovery method: `discover(model, batch, method=...) -> EdgeScores`.

Methods (cost in plain forwards of the batch; a backward without weight gradients costs about one):
- "eap": attribution at the clean run: 2 recording forwards (the clean one with gradients) + 1 backward.
- "eap-ig": EAP-IG, the input embeddings interpolated (`steps`, default 5): 2 + 2 * steps - 1 (its
  last point is the clean run, the recording's).
- "eap-ig-activations": EAP-IG with every writer's output interpolated: 2 + 2 * steps - 1.
- "exact": each edge ablated alone (the slow reference): one resumed run per edge.
- "acdc": ACDC (`threshold`; `candidates`, an EdgeScores or edge names, restricts it to those
  edges): one resumed run per edge tried.
Scores are the change in the metric (mean over prompts) when the edge is ablated: exact for
"exact" and ACDC, first-order estimates for the EAP family.
"""

from __future__ import annotations

import time

import torch

from mechscope.discovery.acdc import acdc, exact_effects
from mechscope.discovery.eap import edge_attribution
from mechscope.discovery.edges import check_ablation
from mechscope.discovery.evaluate import Evaluator
from mechscope.discovery.graph import Graph
from mechscope.discovery.scores import EdgeScores
from mechscope.errors import InputError
from mechscope.metrics import Metric, check_metric_name
from mechscope.models.hooked import HookedModel, technique
from mechscope.tasks.batch import ContrastiveBatch

METHODS = ("eap", "eap-ig", "eap-ig-activations", "exact", "acdc")
EAP_METHODS = ("eap", "eap-ig", "eap-ig-activations")


@technique
def discover(
    model: HookedModel,
    batch: ContrastiveBatch,
    *,
    method: str,
    graph: Graph | None = None,
    metric: str | Metric = "logit_diff",
    ablation: str = "corrupt",
    progress: bool = False,
    steps: int = 5,
    threshold: float | None = None,
    candidates=None,
    memory_mb: int = 2048,
    evaluator: Evaluator | None = None,
) -> EdgeScores:
    """Score every edge of `graph` (default: the whole model, q/k/v split) by `method`. An `Evaluator`
    of the same graph, batch and ablation saves recording the clean and ablated runs again (its
    metric is the one used)."""
    start = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    check_ablation(ablation)
    check_metric_name(metric)
    if method.startswith("eap-ig") and (not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be a positive integer, not {steps!r}")
    if method == "acdc" and (threshold is None or not threshold >= 0):
        raise InputError(f"ACDC needs a threshold >= 0 (e.g. threshold=0.01), not {threshold!r}")
    graph = graph or (evaluator.graph if evaluator is not None else Graph.from_model(model))
    if evaluator is not None and (evaluator.graph.to_spec() != graph.to_spec() or evaluator.patcher.batch is not batch
                                  or evaluator.patcher.ablation != ablation
                                  or (isinstance(metric, str) and metric != evaluator.metric_name)):
        raise InputError("this evaluator was built for another graph, batch, ablation or metric; build one with "
                         "Evaluator(model, batch, graph, ablation=..., metric=...) or leave it out")
    ev = evaluator or Evaluator(model, batch, graph, ablation=ablation, metric=metric, memory_mb=memory_mb,
                                gradients=method in EAP_METHODS)  # EAP's gradient pass is the clean recording
    extra: dict = {"graph": graph.to_spec(), "n_nodes": graph.n_nodes, "n_edges_total": graph.n_edges,
                   "clean_metric": ev.clean, "empty_metric": ev.empty}
    kept = None
    if method in EAP_METHODS:
        n = 1 if method == "eap" else steps
        values = edge_attribution(ev.patcher, ev.fn, steps=n,
                                  interpolate="activations" if method == "eap-ig-activations" else "inputs")
        extra["steps"] = n
    elif method == "exact":
        values = exact_effects(ev, progress=progress)
    else:
        mask = None if candidates is None else _candidates(graph, candidates)
        values, keep = acdc(ev, threshold=threshold, candidates=mask, progress=progress)
        kept = tuple(graph.edge_names[i] for i in keep.nonzero().flatten().tolist())
        extra.update(threshold=threshold, n_candidates=graph.n_edges if mask is None else int(mask.sum()))
    return EdgeScores(values=values.detach().double(), axes=("edge",), labels={"edge": graph.edge_names},
                      technique=method, model=model.cfg.model_name, n_prompts=len(batch),
                      seconds=time.perf_counter() - start, extra=extra, method=method, metric=ev.metric_name,
                      ablation=ablation, circuit_edges=kept)


def _candidates(graph: Graph, candidates) -> torch.Tensor:
    """An EdgeScores (with its own circuit or scores: use .circuit(...).mask), a Circuit, a mask or
    edge names -> mask [n_edges]."""
    if isinstance(candidates, torch.Tensor) and candidates.dtype == torch.bool:
        if candidates.shape != (graph.n_edges,):
            raise InputError(f"a candidate mask must have one entry per edge ({graph.n_edges})")
        return candidates
    if hasattr(candidates, "mask"):
        return candidates.mask
    return graph.mask(list(candidates))
