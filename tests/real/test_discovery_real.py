"""Circuit discovery on SmolLM2-135M with IOI prompts (EAP-IG, 5 steps, 24 prompts).

Measured here: the top 2% of 70,651 edges keep 0.35 of the logit difference (0.15 when found on 16
prompts, 0.40 on 64), a random 2% 0.00; the top 15% keep 0.88, and 0.85 to 0.89 on fresh prompts;
faithfulness 0.8 takes about 10,000 edges (14%). The issue's target, 0.8 with at most 2% of the
edges, is not met on this model (see the session note); the test asserts what holds."""

import pytest
import torch

from mechscope.discovery import Evaluator, Graph, discover
from mechscope.tasks import ContrastiveBatch, ioi

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("no_grad"), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_eap_ig_circuit_is_faithful_and_names_the_ioi_heads(smollm2, smollm2_ioi):
    batch = ContrastiveBatch.from_records(smollm2, ioi(24, seed=0, model=smollm2))
    fresh = ContrastiveBatch.from_records(smollm2, ioi(16, seed=1000, model=smollm2))
    graph = Graph.from_model(smollm2)
    ev = Evaluator(smollm2, batch, graph)
    scores = discover(smollm2, batch, method="eap-ig", evaluator=ev)
    small, large = (scores.circuit(edges=int(f * graph.n_edges)) for f in (0.02, 0.15))
    g = torch.Generator().manual_seed(0)
    random = torch.zeros(graph.n_edges, dtype=torch.bool)
    random[torch.randperm(graph.n_edges, generator=g)[:len(small)]] = True
    f_small, f_large, f_random = ev.faithfulness(ev.metric(torch.stack([~small.mask, ~large.mask, ~random]))).tolist()
    assert f_large >= 0.8  # 15% of the edges carry the task
    assert f_small > f_random + 0.2  # the top 2% are far better than chance
    fresh_faith = Evaluator(smollm2, fresh, graph).evaluate(large)["faithfulness"]
    assert fresh_faith >= 0.7  # and the circuit holds on prompts it was not found on
    cmp = scores.compare_to([h for heads in smollm2_ioi["circuit"].values() for h in heads])  # "23.3", ...
    assert cmp["roc_auc"] > 0.7  # the heads the IOI study found score high as nodes
    print(f"faithfulness: top 2% {f_small:.3f} (random {f_random:.3f}), top 15% {f_large:.3f}, fresh {fresh_faith:.3f}; "
          f"node ROC AUC against the IOI heads {cmp['roc_auc']:.3f}")
