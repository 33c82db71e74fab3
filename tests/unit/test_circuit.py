"""Knockout by mean ablation per template, and faithfulness."""

import pytest
import torch

from conftest import tiny_model
from mechscope import InputError
from mechscope.analysis.circuit import Knockouts, faithfulness, group_means, parse_heads
from mechscope.patching.suffix import length_buckets
from mechscope.metrics import logit_diff, read_logits
from mechscope.tasks import ContrastiveBatch

pytestmark = pytest.mark.usefixtures("no_grad")


def grouped_batch(model) -> ContrastiveBatch:
    """Two templates, two prompts each (equal lengths within a template)."""
    records = [
        {"clean": "ab cd", "corrupt": "xy zw", "answer": "a", "wrong": "b", "template": "T1"},
        {"clean": "ef gh", "corrupt": "uv st", "answer": "c", "wrong": "d", "template": "T1"},
        {"clean": "one two!", "corrupt": "six ten?", "answer": "e", "wrong": "f", "template": "T2"},
        {"clean": "red fox.", "corrupt": "big cat,", "answer": "g", "wrong": "h", "template": "T2"},
    ]
    return ContrastiveBatch.from_records(model, records)


def test_group_means_are_per_template_and_position(model):
    batch = grouped_batch(model)
    means = group_means(model, batch)
    _, cache = model.run_with_cache(batch.corrupt, names_filter=lambda n: n.endswith("hook_z"))
    z = cache["z", 1]
    torch.testing.assert_close(means["blocks.1.attn.hook_z"][0], z[:2].mean(0))
    torch.testing.assert_close(means["blocks.1.attn.hook_z"][3], z[2:].mean(0))


def test_faithfulness_against_a_literal_knockout(model):
    batch = grouped_batch(model)
    circuit = ["1.2", (2, 0)]
    result = faithfulness(model, batch, circuit)
    _, cache = model.run_with_cache(batch.corrupt, names_filter=lambda n: n.endswith("hook_z"))

    def knock(act, hook):  # literal: every prompt, every head outside the circuit, its template's mean
        act = act.clone()
        for i, group in enumerate(batch.groups):
            rows = [j for j, g in enumerate(batch.groups) if g == group]
            for h in range(model.cfg.n_heads):
                if (hook.layer, h) not in {(1, 2), (2, 0)}:
                    act[i, :, h] = cache[hook.name][rows, :, h].mean(0)
        return act

    logits = model.run_with_hooks(batch.clean, fwd_hooks=[(lambda n: n.endswith("hook_z"), knock)])
    expected = logit_diff(read_logits(logits, batch), batch).mean().item()
    assert result.circuit_logit_diff == pytest.approx(expected, abs=1e-10)
    assert result.n_heads == 2 and result.ratio == pytest.approx(expected / result.model_logit_diff)
    whole = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    assert faithfulness(model, batch, whole).ratio == pytest.approx(1.0, abs=1e-10)


def test_knockouts_resumed_from_a_remembered_circuit_equal_fresh_ones(model):
    """Sets C \\ K resume from C's recorded run at K's first layer: the numbers of running them alone."""
    batch = grouped_batch(model)
    circuit = {(0, 1), (1, 2), (2, 0), (2, 3)}
    sets = [circuit - {h} for h in sorted(circuit)] + [circuit - {(2, 0), (2, 3)}, set(), circuit | {(1, 0)}, circuit]
    fresh = Knockouts(model, batch)
    expected = [fresh.logit_diffs([s])[0] for s in sets]  # one at a time, from the clean run
    ko = Knockouts(model, batch, chunk=3)
    ko.remember(circuit)
    assert ko.logit_diffs(sets) == pytest.approx(expected, abs=1e-10)
    assert len({round(v, 6) for v in expected}) == len(sets)  # every set changes the number


def test_bad_heads():
    model = tiny_model("gpt2")
    assert parse_heads(["0.1", (2, 3)]) == {(0, 1), (2, 3)}
    with pytest.raises(InputError, match=r"heads \[\(9, 0\)\] are not in this model"):
        faithfulness(model, grouped_batch(model), ["9.0"])


def test_group_means_a_chunk_at_a_time_equal_one_pass(model):
    batch = grouped_batch(model)
    whole, one_by_one = group_means(model, batch, chunk=len(batch)), group_means(model, batch, chunk=1)
    for name in whole:
        torch.testing.assert_close(one_by_one[name], whole[name], atol=1e-12, rtol=0)


def test_completeness_and_minimality_drop_the_runs_they_record():
    """Their recorded runs are dropped when they return (memory), the caller's kept, and every number
    is the one of knockouts run alone from the clean run."""
    from mechscope.analysis.circuit import completeness, minimality

    model = tiny_model("llama-gqa")
    batch = grouped_batch(model)
    classes = {"a": {(0, 1), (1, 2)}, "b": {(2, 0), (2, 3)}, "c": {(1, 0)}}
    circuit = set().union(*classes.values())
    ko = Knockouts(model, batch, chunk=3)
    assert ko.remember(circuit) and not ko.remember(circuit)  # a second time records nothing
    kept = [b[0] for p in ko.parts for b in p.bases]
    found = completeness(model, batch, classes, knockouts=ko)
    scores = minimality(model, batch, classes, knockouts=ko)
    assert [b[0] for p in ko.parts for b in p.bases] == kept  # the caller's circuit run is still there, nothing else
    fresh = Knockouts(model, batch)
    for tried in found.tried:
        gone = set().union(*(classes[c] for c in tried["removed"]))
        assert fresh.logit_diffs([circuit - gone, fresh.heads - gone]) == pytest.approx(
            [tried["circuit"], tried["model"]], abs=1e-10)
    (fc,) = fresh.logit_diffs([circuit])
    for name, score in scores.items():
        v = parse_heads([name]).pop()
        rest = circuit - classes[score["class"]]
        without_v, without_class, only_v = fresh.logit_diffs([circuit - {v}, rest, rest | {v}])
        assert score["score"] == pytest.approx(max(abs(fc - without_v), abs(only_v - without_class)), abs=1e-10)
    assert list(scores) == sorted(scores, key=lambda n: parse_heads([n]).pop())  # by layer, then head
    ko.forget(circuit)
    assert [len(p.bases) for p in ko.parts] == [1]  # the unablated run stays


def mixed_length_batch(model) -> ContrastiveBatch:
    """24 prompts of three lengths (5, 8 and 13 bytes), a template per length, in mixed order."""
    words = ["ab cd", "one two!", "a longer one."]
    records = [{"clean": words[i % 3].replace("o", "aeiouy"[i % 6]), "corrupt": words[i % 3][::-1],
                "answer": "xyz"[i % 3], "wrong": "q", "template": f"T{i % 3}"} for i in range(24)]
    return ContrastiveBatch.from_records(model, records)


def test_knockouts_in_length_groups_equal_one_group():
    """Prompts run in groups of similar length, each cut at its last read position: every figure is
    the one the whole padded batch gives (float64: to rounding)."""
    from mechscope.analysis.circuit import completeness

    model = tiny_model("llama-gqa")
    batch = mixed_length_batch(model)
    one, two = Knockouts(model, batch, buckets=1, chunk=3), Knockouts(model, batch, buckets=2, chunk=3)
    assert [len(p.batch) for p in one.parts] == [24] and [len(p.batch) for p in two.parts] == [16, 8]
    short, long = (p.batch.clean.shape[1] for p in two.parts)
    assert short < long == batch.clean.shape[1]  # the short prompts are not padded to the long ones' length
    sets = [set(), {(0, 1), (2, 3)}, {(1, 0)}, one.heads - {(2, 1)}]
    assert two.model_logit_diff == pytest.approx(one.model_logit_diff, abs=1e-10)
    assert two.logit_diffs(sets) == pytest.approx(one.logit_diffs(sets), abs=1e-10)
    classes = {"a": {(0, 1), (1, 2)}, "b": {(2, 0), (2, 3)}}
    tried = [completeness(model, batch, classes, knockouts=ko).tried for ko in (one, two)]
    assert [t["removed"] for t in tried[1]] == [t["removed"] for t in tried[0]]
    assert [t["gap"] for t in tried[1]] == pytest.approx([t["gap"] for t in tried[0]], abs=1e-10)
    assert len({round(v, 6) for v in one.logit_diffs(sets)}) == len(sets)  # every set changes the number


def test_length_groups_cut_where_the_fewest_positions_run():
    """Against every way to cut the sorted lengths in two (groups of 8 or more)."""
    lengths = torch.tensor([14] * 6 + [15] * 15 + [16] * 2 + [17] * 6 + [18] * 6 + [20] * 5)
    shuffled = lengths[torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))]
    parts = length_buckets(shuffled, 2)
    assert sorted(torch.cat(parts).tolist()) == list(range(len(lengths)))  # every prompt once
    cost = sum(len(p) * int(shuffled[p].max()) for p in parts)
    n = len(lengths)
    assert cost == min(k * int(lengths[k - 1]) + (n - k) * 20 for k in range(8, n - 7)) == 695  # 800 in one
    assert len(length_buckets(torch.full((30,), 9), 2)) == 1  # equal lengths: nothing to gain
    assert len(length_buckets(shuffled[:12], 2)) == 1  # too few prompts for two groups of 8
