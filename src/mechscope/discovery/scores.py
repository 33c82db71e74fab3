"""EdgeScores (what every discovery method returns) and Circuit (a set of edges).

A circuit is chosen from scores by |score|: the top edges (`edges=N`) or those above a threshold,
or (`signed=True`) by the signed effect toward the empty run: the edges whose removal moves the metric
furthest toward the all-ablated run come first, and edges whose removal helps the task come last (as
the EAP-IG repository's `absolute=False`, and MIB's circuit performance ratio). The circuit is then
pruned of what cannot matter: an edge into a head or MLP that writes to nothing left in the circuit,
and an edge out of a head or MLP that reads nothing left in it (as the EAP-IG repository prunes),
until nothing changes. `greedy=True` grows the circuit from the logits instead: the best
edge whose reader already sits in the circuit, one at a time (EAP-IG's greedy mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechscope.discovery.graph import Graph
from mechscope.errors import InputError
from mechscope.result import Result


@dataclass(frozen=True, kw_only=True)
class EdgeScores(Result):
    """One score per edge of `graph`: the estimated (or exact) change in the metric when that edge
    alone is ablated. Axes ("edge",). `extra["graph"]` rebuilds the graph without a model."""

    method: str = ""
    metric: str = ""
    ablation: str = "corrupt"
    circuit_edges: tuple[str, ...] | None = None  # ACDC's own circuit (the edges it kept)

    @property
    def graph(self) -> Graph:
        return Graph.from_spec(self.extra["graph"])

    def node_scores(self) -> dict[str, float]:
        """Each writer's importance: the sum of |score| over its outgoing edges."""
        out: dict[str, float] = {}
        for name, v in zip(self.labels["edge"], self.values.tolist()):
            writer = name.split("->")[0]
            out[writer] = out.get(writer, 0.0) + abs(v)
        return out

    def circuit(self, *, edges: int | None = None, threshold: float | None = None, greedy: bool = False,
                prune: bool = True, signed: bool = False) -> "Circuit":
        """The top `edges` edges by |score| (or those with |score| >= threshold), pruned (see the module
        docstring); `greedy` grows it from the logits; `signed` ranks by the effect toward the empty run
        instead of its size. ACDC's result with neither edges nor threshold: its own circuit."""
        g = self.graph
        if edges is None and threshold is None:
            if self.circuit_edges is None:
                raise InputError("give edges=N or threshold=t to choose a circuit from the scores")
            return Circuit(g, g.mask(self.circuit_edges))
        if (edges is None) == (threshold is None):
            raise InputError("give either edges=N or threshold=t, not both")
        score = self.ranking(signed)
        if edges is not None:
            if not 0 <= edges <= g.n_edges:
                raise InputError(f"edges must be between 0 and {g.n_edges}, not {edges}")
            chosen = _greedy(g, score, edges) if greedy else _top(score, edges)
        else:
            chosen = score >= threshold
        return Circuit(g, _prune(g, chosen) if prune else chosen)

    def ranking(self, signed: bool = False) -> Tensor:
        """What circuits are chosen by, per edge [n_edges]: |score|, or with `signed` the score's part
        toward the empty run (the metric falls when an edge that carries a logit difference is removed,
        and rises for a distance like KL). Edges without a score (NaN) rank last."""
        if not signed:
            return self.values.abs().nan_to_num(-1.0)
        clean, empty = self.extra.get("clean_metric"), self.extra.get("empty_metric")
        toward = 1.0 if clean is not None and empty is not None and empty > clean else -1.0
        return (toward * self.values).nan_to_num(-math.inf)

    def compare_to(self, reference) -> dict:
        """Scores against a known set of nodes (e.g. the heads `mechscope ioi` found: "9.6" as the
        study names them, "a9.h6", or (layer, head) pairs) or of edge names: ROC AUC of the node (or edge) scores, and
        precision and recall of the top-|reference| items."""
        ref = {_node_name(x) for x in reference}
        is_edges = all("->" in r for r in ref)
        items = dict(zip(self.labels["edge"], self.values.abs().tolist())) if is_edges else {
            k: v for k, v in self.node_scores().items() if k != "input"}
        unknown = [r for r in ref if r not in items]
        if unknown:
            raise InputError(f"{unknown[:5]} are not {'edges' if is_edges else 'nodes'} of this graph")
        names = list(items)
        labels = torch.tensor([n in ref for n in names])
        scores = torch.tensor([items[n] for n in names], dtype=torch.float64)
        top = {names[i] for i in scores.argsort(descending=True)[:len(ref)].tolist()}
        hits = len(top & ref)
        return {"roc_auc": roc_auc(scores, labels), "precision": hits / max(1, len(top)),
                "recall": hits / max(1, len(ref)), "n_reference": len(ref), "n_items": len(names),
                "level": "edges" if is_edges else "nodes"}

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["circuit_edges"] = None if self.circuit_edges is None else list(self.circuit_edges)
        return d

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        if d.get("circuit_edges") is not None:
            d["circuit_edges"] = tuple(d["circuit_edges"])
        return super().from_dict(d)

    def _title(self) -> str:
        return f"{self.method} edge scores"


@dataclass(frozen=True)
class Circuit:
    """A set of edges of a graph, as a boolean mask [n_edges]."""

    graph: Graph
    mask: Tensor = field(repr=False)

    @property
    def edges(self) -> list[str]:
        return [self.graph.edge_names[i] for i in self.mask.nonzero().flatten().tolist()]

    @property
    def nodes(self) -> list[str]:
        g = self.graph
        kept = self.mask.nonzero().flatten()
        names = {g.writers[w].name for w in g.edges[kept, 0].tolist()}
        names |= {f for r in g.edges[kept, 1].tolist() for f in (g.readers[r].feeds or ("logits",))}
        return sorted(names)

    def __len__(self) -> int:
        return int(self.mask.sum())

    def __repr__(self) -> str:
        return f"Circuit({len(self)} of {self.graph.n_edges} edges, {len(self.nodes)} nodes)"


def _node_name(x) -> str:
    """(9, 6), "9.6" (the IOI study's names) or "a9.h6" -> "a9.h6"; anything else as it is."""
    if isinstance(x, (tuple, list)):
        return f"a{int(x[0])}.h{int(x[1])}"
    text = str(x)
    layer, dot, head = text.partition(".")
    return f"a{layer}.h{head}" if dot and layer.isdigit() and head.isdigit() else text


def _top(score: Tensor, n: int) -> Tensor:
    chosen = torch.zeros(score.shape[0], dtype=torch.bool)
    chosen[score.argsort(descending=True, stable=True)[:n]] = True
    return chosen


def _greedy(g: Graph, score: Tensor, n: int) -> Tensor:
    """Grow from the logits: repeatedly take the best edge whose reader feeds a node already in."""
    chosen = torch.zeros(g.n_edges, dtype=torch.bool)
    inside = {"logits"}
    feeds = [g.readers[r].feeds or ("logits",) for r in range(len(g.readers))]
    order = score.argsort(descending=True, stable=True).tolist()
    edges = g.edges.tolist()
    while int(chosen.sum()) < n:
        for e in order:
            if not chosen[e] and any(f in inside for f in feeds[edges[e][1]]):
                chosen[e] = True
                inside.add(g.writers[edges[e][0]].name)
                break
        else:
            break
    return chosen


def _prune(g: Graph, chosen: Tensor) -> Tensor:
    """Drop edges into nodes that write to nothing kept, and out of nodes that read nothing kept."""
    chosen = chosen.clone()
    edges = g.edges.tolist()
    writer_names = [w.name for w in g.writers]
    feeds = [g.readers[r].feeds for r in range(len(g.readers))]
    while True:
        kept = chosen.nonzero().flatten().tolist()
        writing = {writer_names[edges[e][0]] for e in kept}  # nodes with a kept outgoing edge
        reading = {f for e in kept for f in feeds[edges[e][1]]}  # nodes with a kept incoming edge
        drop = [e for e in kept
                if (feeds[edges[e][1]] and not any(f in writing for f in feeds[edges[e][1]]))
                or (g.writers[edges[e][0]].kind != "input" and writer_names[edges[e][0]] not in reading)]
        if not drop:
            return chosen
        chosen[drop] = False


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve: the chance that a random positive outscores a random negative
    (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return (greater + 0.5 * ties).item()
