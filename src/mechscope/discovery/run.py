"""`mechscope discover` as a library call: find a circuit, measure it, and say what it cost.

1. score every edge with the chosen method;
2. evaluate the circuits of growing size in one batch (the faithfulness curve);
3. choose the circuit (ranked by the signed effect, or by |score| with `signed=False`; by default
   signed for every method but EAP, see `default_signed`): `edges=N` (top N, pruned), ACDC's own, or
   the smallest top-N circuit whose faithfulness on the discovery prompts reaches `target` (by
   bisection on the curve);
4. evaluate it on fresh prompts when given;
5. return a JSON-ready record (discover.json) with the time of each step, as a multiple of one
   plain forward of the batch too.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from mechscope.discovery.discover import discover
from mechscope.discovery.evaluate import Evaluator
from mechscope.discovery.graph import Graph
from mechscope.discovery.scores import EdgeScores
from mechscope.models.hooked import HookedModel
from mechscope.tasks.batch import ContrastiveBatch

TOP_EDGES = 300  # edges listed with their scores in discover.json (all of them are in scores.json)


def run_discovery(model: HookedModel, batch: ContrastiveBatch, *, method: str = "eap-ig", steps: int = 5,
                  threshold: float | None = None, edges: int | None = None, ablation: str = "corrupt",
                  metric: str = "logit_diff", eval_batch: ContrastiveBatch | None = None, target: float = 0.8,
                  signed: bool | None = None, progress: bool = False, log: Callable[[str], None] = lambda text: None,
                  cluster=None) -> tuple[dict, EdgeScores]:
    """(the discover.json record, the EdgeScores of every edge). A `mechscope.distributed.Cluster`
    scores the edges on its workers (the same scores); the rest runs here. `signed=None` ranks as
    `default_signed(method)` says."""
    start = time.perf_counter()
    signed = default_signed(method) if signed is None else signed
    graph = Graph.from_model(model)
    log(f"{graph}")
    forward = _plain_forward_seconds(model, batch)
    t = time.perf_counter()
    ev = Evaluator(model, batch, graph, ablation=ablation, metric=metric,  # the clean and ablated runs, recorded
                   gradients=cluster is None and method.startswith("eap"))  # (the clean one is EAP's gradient pass)
    if cluster is None:
        scores = discover(model, batch, method=method, graph=graph, metric=metric, ablation=ablation, steps=steps,
                          threshold=threshold, progress=progress, evaluator=ev)
    else:
        scores = cluster.run(discover, batch, method=method, graph=graph, metric=metric, ablation=ablation,
                             steps=steps, threshold=threshold, progress=progress)
    method_seconds = time.perf_counter() - t
    log(f"{method}: {method_seconds:.1f} s, recording included ({method_seconds / forward:.1f} plain forwards)")
    t = time.perf_counter()
    curve = ev.curve(scores, signed=signed)
    log(f"faithfulness curve over {len(curve['sizes'])} sizes: {time.perf_counter() - t:.1f} s")
    if edges is not None:
        circuit = scores.circuit(edges=edges, signed=signed)
        chosen = f"the top {edges} edges by {'signed score' if signed else '|score|'}, pruned"
    elif method == "acdc":
        circuit, chosen = scores.circuit(), f"ACDC's circuit at threshold {threshold:g}"
    else:
        found = ev.smallest(scores, target, curve, signed=signed)
        if found is None:
            circuit, chosen = scores.circuit(edges=graph.n_edges), f"no top-N circuit reached faithfulness {target}: the whole graph"
        else:
            circuit = found[0]
            chosen = (f"the smallest top-N circuit (by {'signed score' if signed else '|score|'}) with faithfulness "
                      f">= {target} on the discovery prompts")
    found_eval = ev.evaluate(circuit)
    record = {
        "model": model.cfg.model_name, "method": method, "metric": ev.metric_name, "ablation": ablation,
        "n_prompts": len(batch), "n_nodes": graph.n_nodes, "n_edges_total": graph.n_edges,
        "steps": scores.extra.get("steps"), "threshold": threshold, "selection": "signed" if signed else "abs",
        "chosen": chosen, "circuit": circuit.edges, "circuit_nodes": circuit.nodes,
        "n_circuit_edges": len(circuit), "edge_fraction": len(circuit) / graph.n_edges,
        "faithfulness": found_eval["faithfulness"], "clean_metric": ev.clean, "empty_metric": ev.empty,
        "circuit_metric": found_eval["metric"], "curve": curve,
        "faithfulness_eval": None, "n_eval_prompts": None,
        "top_edges": [{"edge": label["edge"], "score": value} for label, value in scores.top(TOP_EDGES)],
        "circuit_scores": {e: scores.values[graph.edge_index[e]].item() for e in circuit.edges},
        "node_scores": scores.node_scores(), "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads,
        "n_kv_heads": model.cfg.n_kv_heads,
        "forward_seconds": forward, "method_seconds": method_seconds,
        "forward_equivalents": method_seconds / forward, "workers": 0 if cluster is None else cluster.workers,
    }
    if eval_batch is not None:
        fresh = Evaluator(model, eval_batch, graph, ablation=ablation, metric=metric).evaluate(circuit)
        record.update(faithfulness_eval=fresh["faithfulness"], n_eval_prompts=len(eval_batch),
                      eval_clean_metric=fresh["clean"], eval_empty_metric=fresh["empty"])
        log(f"on {len(eval_batch)} fresh prompts: faithfulness {fresh['faithfulness']:.3f}")
    record["seconds"] = time.perf_counter() - start
    return record, scores


def default_signed(method: str) -> bool:
    """Whether `method`'s circuits rank edges by signed effect by default: yes for all but EAP.
    Measured on SmolLM2 with 24 IOI prompts (`benchmarks/discovery.py`; area under the faithfulness
    curve, signed against |score|): EAP-IG 0.550 against 0.328, EAP-IG on activations 0.541 against
    0.331, ACDC's exact effects 0.835 against 0.311; but EAP 0.021 against 0.255 (its top 20,000
    edges by signed score keep 0.022 of the logit difference; why is not established)."""
    return method != "eap"


def _plain_forward_seconds(model: HookedModel, batch: ContrastiveBatch) -> float:
    """The best of three plain forwards of the clean prompts (the unit of cost)."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            model(batch.clean)
            best = min(best, time.perf_counter() - t)
    return best
