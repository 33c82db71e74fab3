"""Ground truth no one chose: a two-layer model trained here until it does induction. Discovery
must find the previous-token head -> induction head key edge and the induction head -> logits edge
among its top edges, and the head detectors must name the same heads."""

import pytest

from mechscope.analysis.heads import head_scores
from mechscope.discovery import Evaluator, Graph, discover
from mechscope.organisms import induction

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def trained():
    model, curve = induction.train(seed=0)  # about 30 s on two cores
    return model, curve


def test_discovery_finds_the_induction_circuit(trained):
    model, curve = trained
    assert curve[0] > 3.0  # chance: ln 48 = 3.9 nats
    assert induction.repeat_loss(model) < 0.3  # near zero on the repeat of held-out sequences
    detected = head_scores(model, n=16, length=12)
    prev = detected["previous_token"].values  # [layer, head]
    ind = detected["induction"].values
    prev_head = int(prev[0].argmax())
    assert prev[0, prev_head] > 0.6  # a previous-token head in layer 0
    induction_heads = {h for h in range(model.cfg.n_heads) if ind[1, h] > 0.5}
    assert induction_heads  # and induction heads in layer 1

    batch = induction.contrast(model, 32)
    ev = Evaluator(model, batch, Graph.from_model(model))
    assert ev.clean > 5 and ev.empty < 1  # the clean prompts need induction; the corrupt ones defeat it
    for method in ("eap-ig", "exact"):
        scores = discover(model, batch, method=method, evaluator=ev)
        top = [label["edge"] for label, _ in scores.top(10)]  # of 110 edges
        key_edges = [e for e in top if e.startswith(f"a0.h{prev_head}->a1.h") and e.endswith("<k")]
        assert key_edges, (method, top)
        assert all(int(e.split("->a1.h")[1][0]) in induction_heads for e in key_edges)
        to_logits = [e for e in top if e.startswith("a1.h") and e.endswith("->logits")]
        assert to_logits and all(int(e[4]) in induction_heads for e in to_logits), (method, top)
    # and the circuit it implies is faithful
    circuit = discover(model, batch, method="eap-ig", evaluator=ev).circuit(edges=20)
    assert ev.evaluate(circuit)["faithfulness"] > 0.7
