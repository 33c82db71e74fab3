"""Circuit discovery on SmolLM2-135M with IOI prompts (EAP-IG, 5 steps).

Measured here (70,651 edges; 2% is 1,413), faithfulness on the 64 prompts the scores came from / on 16
fresh ones:
- ranked by signed score (the edges whose removal lowers the logit difference most first): top 0.5%
  0.45 / 0.60, 1% 0.67 / 0.83, 2% 0.94 / 1.14, 5% 1.04 / 1.17; found on 24 prompts, the top 2% keep
  0.75 / 1.06;
- ranked by |score| (the EAP-IG paper's choice), edges that work against the task rank as high as those
  that carry it: top 2% 0.40 / 0.25, 5% 0.56 / 0.69, 15% 0.74 / 0.57, 30% 0.93 / 0.71;
- a random 2% keep 0.00."""

import pytest
import torch

from mechscope.discovery import Evaluator, Graph, discover
from mechscope.tasks import ContrastiveBatch, ioi

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("no_grad"), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_eap_ig_circuit_is_faithful_and_names_the_ioi_heads(smollm2, smollm2_ioi):
    batch = ContrastiveBatch.from_records(smollm2, ioi(64, seed=0, model=smollm2))
    fresh = ContrastiveBatch.from_records(smollm2, ioi(16, seed=1000, model=smollm2))
    graph = Graph.from_model(smollm2)
    ev = Evaluator(smollm2, batch, graph, gradients=True)
    scores = discover(smollm2, batch, method="eap-ig", evaluator=ev)
    two = int(0.02 * graph.n_edges)
    signed, by_size = scores.circuit(edges=two, signed=True), scores.circuit(edges=two)
    g = torch.Generator().manual_seed(0)
    random = torch.zeros(graph.n_edges, dtype=torch.bool)
    random[torch.randperm(graph.n_edges, generator=g)[:two]] = True
    f_signed, f_size, f_random = ev.faithfulness(ev.metric(torch.stack([~signed.mask, ~by_size.mask, ~random]))).tolist()
    assert len(signed) <= two and f_signed >= 0.8  # the target: 2% of the edges carry the task
    assert f_size > f_random + 0.2  # by |score| the top 2% carry less, but far more than chance
    fresh_signed = Evaluator(smollm2, fresh, graph).evaluate(signed)["faithfulness"]
    assert fresh_signed >= 0.7  # and the circuit holds on prompts it was not found on
    cmp = scores.compare_to([h for heads in smollm2_ioi["circuit"].values() for h in heads])  # "23.3", ...
    assert cmp["roc_auc"] > 0.7  # the heads the IOI study found score high as nodes
    print(f"faithfulness of the top 2%: by signed score {f_signed:.3f} (fresh {fresh_signed:.3f}), by |score| "
          f"{f_size:.3f}, random {f_random:.3f}; node ROC AUC against the IOI heads {cmp['roc_auc']:.3f}")
