"""The discovery graph, edge patching's two ends, ACDC's thresholds, circuits and EdgeScores."""

import math

import pytest
import torch

from conftest import exact_for, tiny_batch, tiny_model
from mechscope.discovery import EdgeScores, Evaluator, Graph, discover, evaluate
from mechscope.discovery.scores import roc_auc
from mechscope.errors import InputError
from mechscope.metrics import read_logits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def hand_count(n_layers, n_heads, n_kv, parallel, split=True):
    """Edges counted reader by reader: what each reads is everything written before it."""
    readers_per_layer = n_heads + 2 * n_kv if split else n_heads
    total = 0
    for l in range(n_layers):
        before_attention = 1 + l * (n_heads + 1)  # input, then every earlier layer's heads and MLP
        total += readers_per_layer * before_attention
        total += before_attention + (0 if parallel else n_heads)  # the MLP also reads its own layer's heads
    return total + 1 + n_layers * (n_heads + 1)  # the logits read every writer


@pytest.mark.parametrize("n_layers,n_heads,n_kv,parallel", [(3, 4, 4, False), (3, 4, 4, True), (2, 9, 3, False), (30, 9, 3, False)])
def test_edge_count_matches_a_hand_count(n_layers, n_heads, n_kv, parallel):
    from mechscope.discovery.graph import GraphSpec

    g = Graph(GraphSpec(n_layers, n_heads, n_kv, parallel))
    assert g.n_edges == hand_count(n_layers, n_heads, n_kv, parallel)
    assert g.n_nodes == 1 + n_layers * (n_heads + 1) + 1
    assert len(set(g.edge_names)) == g.n_edges
    if n_kv == n_heads:
        merged = Graph(GraphSpec(n_layers, n_heads, n_kv, parallel, split_qkv=False))
        assert merged.n_edges == hand_count(n_layers, n_heads, n_kv, parallel, split=False)


def test_graph_names_and_restriction(model):
    g = Graph.from_model(model)
    gqa = model.cfg.n_kv_heads < model.cfg.n_heads
    assert "input->a0.h1<q" in g.edge_index and "a2.h3->logits" in g.edge_index
    assert (f"a0.h0->a1.{'kv' if gqa else 'h'}{model.cfg.n_kv_heads - 1}<k") in g.edge_index
    assert ("a1.h0->m1" in g.edge_index) == (not model.cfg.parallel_residual)  # same-layer MLP reads attention
    assert "a1.h0->a1.h2<q" not in g.edge_index and "m2->a1.h0<q" not in g.edge_index
    small = Graph.from_model(model, layers=[1, 2], nodes=["a1.h0", "a2.h1", "m2"])
    assert {w.name for w in small.writers} == {"input", "a1.h0", "a2.h1", "m2"}
    assert "a1.h0->a2.h1<q" in small.edge_index and "a1.h0->logits" in small.edge_index
    with pytest.raises(InputError, match="unknown nodes"):
        Graph.from_model(model, nodes=["a9.h9"])
    with pytest.raises(InputError, match="not an edge"):
        g.edges_of(["a1.h0->a0.h0<q"])
    assert Graph.from_spec(g.to_spec()).edge_names == g.edge_names


def test_no_edge_ablated_is_clean_and_every_edge_ablated_is_the_ablated_run(model):
    batch = tiny_batch(model)
    ev = Evaluator(model, batch, Graph.from_model(model))
    with torch.no_grad():
        clean = read_logits(model(batch.clean), batch)
        corrupt = read_logits(model(batch.corrupt), batch)
        out = ev.patcher.run(torch.tensor([[0] * ev.graph.n_edges, [1] * ev.graph.n_edges], dtype=torch.bool))
    torch.testing.assert_close(out[0], clean, **exact_for(model))
    torch.testing.assert_close(out[1], corrupt, **exact_for(model))
    # zero ablation of every edge: every reader reads only the biases' constant part of the stream
    ev0 = Evaluator(model, batch, Graph.from_model(model), ablation="zero")
    assert ev0.empty != pytest.approx(ev.empty)


def test_small_circuits_run_as_base_plus_kept_edges(model):
    """A circuit with fewer kept than ablated edges runs as each reader's all-ablated input plus the
    kept writers' differences; the direct way (input minus the ablated ones) gives the same logits."""
    batch = tiny_batch(model)
    ev = Evaluator(model, batch, Graph.from_model(model))
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(4, ev.graph.n_edges, generator=g) < torch.tensor([[0.6], [0.8], [0.95], [1.0]])  # mostly ablated
    with torch.no_grad():
        fast = ev.patcher.run(masks)
        ev.patcher.full_graph = False  # forces the direct way
        direct = ev.patcher.run(masks)
    torch.testing.assert_close(fast, direct, **exact_for(model))


def test_mean_ablation_of_every_edge_is_the_mean_run():
    """With every edge mean-ablated, each reader reads the sum of its writers' mean outputs."""
    model = tiny_model("gpt2")
    batch = tiny_batch(model)
    ev = Evaluator(model, batch, Graph.from_model(model), ablation="mean")
    p = ev.patcher
    # the logits read the mean of every writer, plus the constant biases
    with torch.no_grad():
        out = p.run(torch.ones(1, ev.graph.n_edges, dtype=torch.bool))[0]
        bias_part = p.clean_final - p.clean_out.sum(0)[torch.arange(len(batch)), batch.read_pos]
        final = p.ablated_out.sum(0)[torch.arange(len(batch)), batch.read_pos] + bias_part
        torch.testing.assert_close(out, model.logits_from_resid(final), **exact_for(model))


def _kill_head(model, layer, head):
    d = model.cfg.d_head
    with torch.no_grad():
        proj = model.adapter.module(model.adapter.out_proj, layer)
        if model.cfg.family == "gpt2":
            proj.weight[head * d:(head + 1) * d] = 0  # Conv1D: [in, out]
        else:
            proj.weight[:, head * d:(head + 1) * d] = 0


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_acdc_thresholds(family):
    model = tiny_model(family)
    _kill_head(model, 1, 2)  # its edges have no effect at all
    batch = tiny_batch(model)
    ev = Evaluator(model, batch, Graph.from_model(model))
    exact = discover(model, batch, method="exact", evaluator=ev)
    keep_all = discover(model, batch, method="acdc", threshold=0.0, evaluator=ev)
    # "nonzero": above rounding (64 eps of float64); the smallest real effect here is far larger
    assert set(keep_all.circuit_edges) == {n for n, v in zip(exact.labels["edge"], exact.values.tolist()) if abs(v) > 1e-13}
    assert exact.values.abs()[exact.values.abs() > 1e-13].min() > 1e-8
    assert not any(n.startswith("a1.h2->") or n.split("->")[1].startswith("a1.h2<") for n in keep_all.circuit_edges)
    none = discover(model, batch, method="acdc", threshold=math.inf, evaluator=ev)
    assert none.circuit_edges == ()
    kl = discover(model, batch, method="acdc", threshold=1e-3, metric="kl_div")
    found = kl.circuit()
    assert 0 < len(found) < ev.graph.n_edges
    assert evaluate(model, batch, found, metric="kl_div")["metric"] < 0.05  # the kept circuit stays close to clean
    limited = discover(model, batch, method="acdc", threshold=0.0, evaluator=ev, candidates=exact.circuit(edges=20))
    assert set(limited.circuit_edges) <= set(exact.circuit(edges=20).edges)


def _acdc_literal(ev, threshold, ablated):
    """ACDC as the module docstring says it, plainly: m(G) measured before every reader, each edge
    tried in a run of its own."""
    g = ev.graph
    ablated, scores = ablated.clone(), torch.zeros(g.n_edges, dtype=torch.float64)
    for r in sorted(range(len(g.readers)), key=lambda r: (-g.readers[r].stage, -r)):
        live = [e for e in range(g.n_edges) if int(g.edges[e, 1]) == r and not ablated[e]]
        feeds = g.readers[r].feeds
        writing = {g.writers[int(g.edges[e, 0])].name for e in range(g.n_edges) if not ablated[e]}
        if live and feeds and not any(f in writing for f in feeds):
            ablated[live] = True
            continue
        before = ev.metric(ablated[None])[0].double()
        for e in live:
            without = ablated.clone()
            without[e] = True
            scores[e] = ev.metric(without[None])[0].double() - before
        ablated[[e for e in live if abs(scores[e]) <= threshold]] = True
    return scores, ~ablated


@pytest.mark.parametrize("candidates", [False, True])
def test_acdc_equals_its_literal_loop(candidates):
    """The batched ACDC (each reader's edges in one run; m(G) measured only when a step leaves it
    unknown) keeps the same circuit, with the same scores, as the plain loop."""
    model = tiny_model("llama-gqa")
    batch = tiny_batch(model)
    ev = Evaluator(model, batch, Graph.from_model(model))
    exact = discover(model, batch, method="exact", evaluator=ev)
    mask = exact.circuit(edges=60, prune=False).mask if candidates else torch.ones(ev.graph.n_edges, dtype=torch.bool)
    threshold = exact.values.abs()[mask].median().item() / 3  # removes some edges and keeps others
    ours = discover(model, batch, method="acdc", threshold=threshold, evaluator=ev, candidates=mask if candidates else None)
    scores, kept = _acdc_literal(ev, threshold, ~mask)
    assert 0 < int(kept.sum()) < int(mask.sum())
    assert set(ours.circuit_edges) == {ev.graph.edge_names[i] for i in kept.nonzero().flatten().tolist()}
    torch.testing.assert_close(ours.values, scores, atol=1e-12, rtol=0)


def test_circuits_faithfulness_and_curve():
    model = tiny_model("llama-gqa")
    batch = tiny_batch(model)
    ev = Evaluator(model, batch, Graph.from_model(model))
    scores = discover(model, batch, method="eap-ig", evaluator=ev)
    full = scores.circuit(edges=ev.graph.n_edges)
    assert len(full) == ev.graph.n_edges and ev.evaluate(full)["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    assert ev.evaluate(scores.circuit(edges=0))["faithfulness"] == pytest.approx(0.0, abs=1e-9)
    c = scores.circuit(edges=15)
    assert len(c) <= 15
    kept = set(c.edges)
    for e in kept:  # pruned: a kept edge's writer reads something kept, and its reader's node writes something kept
        w, r = e.split("->")
        assert w == "input" or any(_feeds(ev.graph, k, w) for k in kept)
        assert r == "logits" or any(_feeds(ev.graph, e, k.split("->")[0]) for k in kept)
    greedy = scores.circuit(edges=10, greedy=True)
    assert 0 < len(greedy) <= 10 and any(e.endswith("->logits") for e in greedy.edges)
    curve = ev.curve(scores)
    assert curve["sizes"][-1] == ev.graph.n_edges and curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-9)
    assert 0 < curve["area"] <= 1.5
    found = ev.smallest(scores, 0.8, curve)
    assert found is not None and found[1] >= 0.8
    assert ev.evaluate(found[0])["faithfulness"] == pytest.approx(found[1])


def test_signed_ranking_puts_the_effect_toward_the_empty_run_first():
    import dataclasses

    model = tiny_model("gpt2")
    scores = discover(model, tiny_batch(model), method="eap")
    values = torch.zeros(scores.values.shape[0], dtype=torch.float64)
    values[:5] = torch.tensor([-3.0, 2.0, 1.0, -0.5, math.nan])
    first = lambda s, **kw: s.circuit(prune=False, **kw).mask.nonzero().flatten().tolist()
    diff = dataclasses.replace(scores, values=values, extra={**scores.extra, "clean_metric": 1.0, "empty_metric": 0.0})
    assert first(diff, edges=2) == [0, 1]  # by size
    assert first(diff, edges=2, signed=True) == [0, 3]  # a logit difference falls toward the empty run
    assert first(diff, threshold=0.1, signed=True) == [0, 3]
    assert diff.ranking(signed=True)[4] == -math.inf and diff.ranking()[4] == -1.0  # no score: last
    kl = dataclasses.replace(diff, extra={**scores.extra, "clean_metric": 0.0, "empty_metric": 2.0})
    assert first(kl, edges=2, signed=True) == [1, 2]  # a distance rises toward it
    ev = Evaluator(model, tiny_batch(model), scores.graph)
    exact = discover(model, ev.patcher.batch, method="exact", evaluator=ev)
    sizes = [2, 5, 10, 20]
    by_sign = [ev.evaluate(exact.circuit(edges=k, signed=True))["faithfulness"] for k in sizes]
    by_size = [ev.evaluate(exact.circuit(edges=k))["faithfulness"] for k in sizes]
    assert by_sign != pytest.approx(by_size)  # (so the curve below tells the two apart)
    assert ev.curve(exact, sizes=sizes, signed=True)["faithfulness"] == pytest.approx(by_sign)
    found = ev.smallest(exact, 0.5, ev.curve(exact, signed=True), signed=True)
    assert found[1] >= 0.5 and ev.evaluate(found[0])["faithfulness"] == pytest.approx(found[1])


def _feeds(graph, edge, node):
    """Whether the reader of `edge` is an input of `node`."""
    r = graph.readers[int(graph.edges[graph.edge_index[edge], 1])]
    return node in r.feeds


def test_edge_scores_round_trip_and_compare():
    model = tiny_model("gpt2")
    batch = tiny_batch(model)
    scores = discover(model, batch, method="eap")
    back = EdgeScores.from_json(scores.to_json())
    assert back.labels == scores.labels and torch.equal(back.values, scores.values) and back.method == "eap"
    assert back.circuit(edges=5).edges == scores.circuit(edges=5).edges
    nodes = scores.node_scores()
    best = sorted((v, k) for k, v in nodes.items() if k != "input")[-3:]
    cmp = scores.compare_to([k for _, k in best])
    assert cmp["roc_auc"] == 1.0 and cmp["precision"] == 1.0 and cmp["level"] == "nodes"
    assert scores.compare_to([(0, 1), "0.1", "a0.h1"])["n_reference"] == 1
    assert roc_auc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([False, True, True])) == 1.0
    assert roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([False, True])) == 0.5
    with pytest.raises(InputError, match="not nodes"):
        scores.compare_to(["a9.h9"])
    from mechscope.report import render

    page = render(scores)  # a notebook's view: the top edges, never one heatmap cell per edge
    assert "Top edges" in page and scores.labels["edge"][int(scores.values.abs().argmax())] in page
    assert render(back) == page


def test_bad_options_are_refused_before_work():
    model = tiny_model("gpt2")
    batch = tiny_batch(model)
    for kwargs, match in [(dict(method="magic"), "unknown method"), (dict(method="acdc"), "threshold"),
                          (dict(method="acdc", threshold=-1.0), "threshold"), (dict(method="eap-ig", steps=0), "steps"),
                          (dict(method="eap", ablation="noise"), "unknown ablation"), (dict(method="eap", metric="x"), "metric")]:
        with pytest.raises(InputError, match=match):
            discover(model, batch, **kwargs)
    ev = Evaluator(model, batch, Graph.from_model(model))
    with pytest.raises(InputError, match="another graph, batch, ablation or metric"):
        discover(model, batch, method="eap", evaluator=ev, metric="kl_div")
    with pytest.raises(InputError, match="another graph"):
        discover(model, tiny_batch(model), method="eap", evaluator=ev)
    with pytest.raises(InputError, match="split_qkv"):
        Graph.from_model(tiny_model("llama-gqa"), split_qkv=False)
    scores = discover(model, batch, method="eap")
    with pytest.raises(InputError, match="either"):
        scores.circuit(edges=3, threshold=0.1)
    with pytest.raises(InputError, match="edges=N"):
        scores.circuit()


def test_recordings_that_cannot_fit_are_refused_before_any_forward(monkeypatch):
    from mechscope.discovery.edges import EdgePatcher
    from mechscope.models import hooked

    model = tiny_model("llama-gqa")
    batch, graph = tiny_batch(model), Graph.from_model(model)
    forwards = []
    monkeypatch.setattr(hooked, "_available_memory", lambda: 1000)
    with model.hooks([("hook_embed", lambda act, hook: forwards.append(1))]):
        with pytest.raises(InputError, match=r"edge patching 2 prompts of \d+ tokens records .* GiB .* is available: use "
                                             r"fewer or shorter prompts"):
            EdgePatcher(model, graph, batch)
    assert forwards == []
    monkeypatch.setattr(hooked, "_available_memory", lambda: None)  # unknown: no refusal
    patcher = EdgePatcher(model, graph, batch)
    assert patcher.recording_bytes() > 1000
    from mechscope.discovery.eap import edge_attribution

    monkeypatch.setattr(hooked, "_available_memory", lambda: 1000)
    with pytest.raises(InputError, match="edge attribution sums the gradients at"):
        edge_attribution(patcher, lambda logits, batch: logits[:, 0])
