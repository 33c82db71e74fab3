"""Exact edge effects, one edge at a time, and ACDC (Conmy et al. 2023).

`exact_effects`: the metric with each edge alone ablated, minus the clean metric. Edges are sorted
by the layer they are read in, so each batch of variants resumes from that layer.

`acdc`: the automatic circuit discovery of Conmy et al., batched:
1. start from the whole graph (or, with `candidates`, from those edges only: the rest are ablated
   from the start, and that circuit's run is kept as the `Reference` every later run resumes from)
   and measure the metric m(G);
2. visit the readers from the logits backwards (reverse topological order);
3. a reader whose node writes into nothing left in the circuit cannot matter: its incoming edges are
   removed untested;
4. otherwise all its incoming edges are tried in one batch, each removed alone from the current
   circuit (resuming from the reader's layer: no earlier step changed anything before it), and every
   edge whose removal moves the metric by at most `threshold` (|m(G without e) - m(G)| <= threshold)
   is removed;
5. m(G) is measured alongside the next batch only when it is not known: when the last step removed
   one edge, the circuit is that edge's variant, whose metric was just measured; when it removed
   none, or removed edges into a node that writes nothing kept, the circuit computes the same.
With the KL divergence to the clean run as the metric (the paper's default), m(G) starts at 0.
Trying a reader's edges together rather than one after another is the batching; the paper's loop
would re-measure after each removal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mechscope.discovery.evaluate import Evaluator
from mechscope.progress import progress_bar


def exact_effects(ev: Evaluator, *, progress: bool = False) -> Tensor:
    """[n_edges]: metric with the edge ablated - clean metric."""
    g = ev.graph
    order = sorted(range(g.n_edges), key=lambda e: g.readers[int(g.edges[e, 1])].stage)
    step = ev.patcher.variants_per_chunk()
    out = torch.empty(g.n_edges, dtype=torch.float64)
    with progress_bar(progress, g.n_edges, "exact edge effects") as bar:
        for i in range(0, len(order), step):
            chunk = torch.tensor(order[i:i + step])
            masks = torch.zeros(len(chunk) + 1, g.n_edges, dtype=torch.bool)  # row 0: nothing ablated
            masks[torch.arange(1, len(chunk) + 1), chunk] = True
            values = ev.metric(masks).double()
            out[chunk] = values[1:] - values[0]  # against the clean run computed alongside: same rounding
            bar.advance(len(chunk))
    return out


def acdc(ev: Evaluator, *, threshold: float, candidates: Tensor | None = None,
         progress: bool = False) -> tuple[Tensor, Tensor]:
    """(scores [n_edges]: the change in the metric when each tried edge was removed, 0 for edges
    removed untested or outside the candidates; kept [n_edges] bool: the circuit)."""
    g = ev.graph
    ablated = torch.zeros(g.n_edges, dtype=torch.bool) if candidates is None else ~candidates.bool()
    scores = torch.zeros(g.n_edges, dtype=torch.float64)
    edges = g.edges.tolist()
    into: dict[int, list[int]] = {}
    for e, (_, r) in enumerate(edges):
        into.setdefault(r, []).append(e)
    writer_names = [w.name for w in g.writers]
    order = sorted(range(len(g.readers)), key=lambda r: (-g.readers[r].stage, -r))
    current = None  # m(G), the metric of the circuit as it is, when known
    # Every step changes only readers at or after the one it visits: the first circuit's run up to there
    # serves them all (without candidates, that run is the clean one, and the patcher's own)
    reference = None if candidates is None else ev.patcher.reference(ablated)
    with progress_bar(progress, len(order), f"ACDC (threshold {threshold:g})") as bar:
        for r in order:
            bar.advance(1)
            live = [e for e in into.get(r, []) if not ablated[e]]
            if not live:
                continue
            feeds = g.readers[r].feeds
            if feeds:
                writing = {writer_names[w] for w in g.edges[~ablated, 0].unique().tolist()}  # writers still read
                if not any(f in writing for f in feeds):
                    ablated[live] = True
                    continue
            first = int(current is None)  # row 0, when m(G) is not known: the circuit as it is
            masks = ablated.repeat(len(live) + first, 1)  # [variants (+ 1), n_edges]
            masks[torch.arange(first, len(live) + first), torch.tensor(live)] = True
            values = ev.metric(masks, reference).double()
            if first:
                current, values = values[0], values[1:]
            effect = values - current  # [variants], against the current circuit
            scores[live] = effect
            # Below the arithmetic's resolution an effect is no effect (rows of one batch can round differently).
            noise = 64 * torch.finfo(ev.patcher.model.dtype).eps * max(1.0, abs(current.item()))
            gone = [i for i, d in enumerate(effect.tolist()) if abs(d) <= threshold + noise]
            ablated[[live[i] for i in gone]] = True
            # The circuit is now the one variant that lost its edge (m(G) measured), or unknown.
            current = values[gone[0]] if len(gone) == 1 else current if not gone else None
    return scores, ~ablated
