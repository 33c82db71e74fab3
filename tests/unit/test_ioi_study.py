"""The IOI study's parts on tiny random models with one token per word: name positions, attention
from END, OV copy scores, batched knockouts, completeness, minimality, path patching from chosen
senders, and the whole pipeline."""

import json

import pytest
import torch

from conftest import ioi_model
from mechscope.analysis.circuit import Knockouts, completeness, faithfulness, minimality
from mechscope.analysis.heads import attention_from_end, copy_scores
from mechscope.patching import path_patch
from mechscope.result import write_json
from mechscope.studies import CLASSES, Settings, run_ioi
from mechscope.tasks import ContrastiveBatch, ioi
from mechscope.tasks.ioi import name_positions

# Every test passes at zero, and the strongest two of each class stay, so that a random model fills
# every class.
LOOSE = Settings(n=8, n_path=4, threshold=0.0, attention_min=0.0, copy_min=0.0, detector_min=0.0,
                 reference_per_template=2, max_per_class=2)

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def gqa():
    return ioi_model("llama-gqa")


@pytest.fixture(scope="module")
def batch(gqa):
    return ContrastiveBatch.from_records(gqa, ioi(12, seed=0, model=gqa))


def test_name_positions(gqa, batch):
    pos = name_positions(batch)
    rows = torch.arange(len(batch))
    assert (batch.clean[rows, pos["IO"]] == batch.answer).all()
    assert (batch.clean[rows, pos["S1"]] == batch.wrong).all() and (batch.clean[rows, pos["S2"]] == batch.wrong).all()
    assert (pos["S1"] < pos["S2"]).all() and (pos["S2"] < pos["END"]).all() and (pos["IO"] != pos["S1"]).all()
    for i in range(len(batch)):  # S2 is the subject's last mention before END
        tokens = gqa.to_str_tokens(batch.clean_prompts[i])
        assert tokens[int(pos["S2"][i])] == tokens[int(pos["S1"][i])] and tokens[int(pos["END"][i])] == " to"


def test_attention_from_end_against_the_cache(gqa, batch):
    pos = name_positions(batch)
    att = attention_from_end(gqa, batch, {"IO": pos["IO"]})["IO"]
    _, cache = gqa.run_with_cache(batch.clean)
    for layer, head in [(0, 1), (2, 3)]:
        literal = sum(cache["pattern", layer][i, head, batch.read_pos[i], pos["IO"][i]] for i in range(len(batch)))
        assert att.values[layer, head].item() == pytest.approx(literal.item() / len(batch), abs=1e-10)


def test_copy_scores_against_the_hf_modules():
    """GPT-2: the head's value vector times its slice of c_proj, then ln_f and lm_head, by hand."""
    model = ioi_model("gpt2")
    batch = ContrastiveBatch.from_records(model, ioi(6, seed=1, model=model))
    pos = name_positions(batch)
    scores = copy_scores(model, batch, {"IO": pos["IO"]}, k=20)
    sub = copy_scores(model, batch, {"IO": pos["IO"]}, k=20, heads=[(1, 2)])
    _, cache = model.run_with_cache(batch.clean)
    hf, d = model.hf, model.cfg.d_head
    rows = torch.arange(len(batch))
    for layer, head in [(0, 0), (1, 2), (2, 3)]:
        v = cache["v", layer][rows, pos["IO"], head]  # [batch, d_head]
        out = v @ hf.transformer.h[layer].attn.c_proj.weight[head * d:(head + 1) * d]  # [batch, d_model]
        logits = hf.lm_head(hf.transformer.ln_f(out))  # [batch, d_vocab]
        own = logits[rows, batch.answer][:, None]
        copy = ((logits > own).sum(-1) < 20).float().mean().item()
        negative = ((logits < own).sum(-1) < 20).float().mean().item()
        assert scores["copy"].values[layer, head].item() == pytest.approx(copy)
        assert scores["negative_copy"].values[layer, head].item() == pytest.approx(negative)
    assert sub["copy"].values[1, 2] == scores["copy"].values[1, 2] and sub["copy"].values.isnan().sum() == 11


def test_knockouts_batch_many_sets_like_one_at_a_time(gqa, batch):
    ko = Knockouts(gqa, batch, chunk=2)
    sets = [set(), {(0, 1)}, {(1, 0), (2, 3)}, set(ko.heads)]
    together = ko.logit_diffs(sets)
    for keep, value in zip(sets, together):
        assert faithfulness(gqa, batch, keep).circuit_logit_diff == pytest.approx(value, abs=1e-10)
    assert together[-1] == pytest.approx(ko.model_logit_diff, abs=1e-10)


def test_reference_means_come_from_the_reference_prompts(gqa, batch):
    templates = sorted(set(batch.groups))
    reference = ContrastiveBatch.from_records(gqa, [r for t in templates for r in ioi(2, seed=5, model=gqa, templates=[t])])
    ko = Knockouts(gqa, batch, reference=reference)
    _, cache = gqa.run_with_cache(reference.corrupt, names_filter=lambda n: n.endswith("hook_z"))
    i = 3
    rows = [j for j, g in enumerate(reference.groups) if g == batch.groups[i]]
    n = int(batch.read_pos[i]) + 1
    torch.testing.assert_close(ko.means["blocks.1.attn.hook_z"][i, :n], cache["z", 1][rows, :n].mean(0))
    with pytest.raises(Exception, match="no template"):
        Knockouts(gqa, batch, reference=ContrastiveBatch.from_records(gqa, ioi(2, model=gqa, templates=[templates[0]])))


CLASSES_TINY = {"a": ["0.1", "1.2"], "b": ["2.0"], "c": ["1.3", "2.2"]}


def test_minimality_against_literal_knockouts(gqa, batch):
    f = lambda keep: faithfulness(gqa, batch, keep).circuit_logit_diff  # noqa: E731
    circuit = {h for hs in CLASSES_TINY.values() for h in hs}
    result = minimality(gqa, batch, CLASSES_TINY)
    assert set(result) == circuit
    for cls, heads in CLASSES_TINY.items():
        for v in heads:
            rest = set(heads) - {v}
            expected = max(abs(f(circuit) - f(circuit - {v})), abs(f(circuit - rest - {v}) - f(circuit - rest)))
            assert result[v]["score"] == pytest.approx(expected, abs=1e-10) and result[v]["class"] == cls


def test_completeness_greedy_search_against_literal_knockouts(gqa, batch):
    f = lambda keep: faithfulness(gqa, batch, keep).circuit_logit_diff  # noqa: E731
    everyone = [f"{l}.{h}" for l in range(3) for h in range(4)]
    circuit = {h for hs in CLASSES_TINY.values() for h in hs}
    result = completeness(gqa, batch, CLASSES_TINY)
    gone = {h for c in result.removed for h in CLASSES_TINY[c]}
    assert result.circuit_logit_diff == pytest.approx(f(circuit - gone), abs=1e-10)
    assert result.model_logit_diff == pytest.approx(f(set(everyone) - gone), abs=1e-5)
    assert result.gap == max(t["gap"] for t in result.tried)  # greedy kept the widest gap it saw
    assert result.tried[0]["removed"] == [] and len(result.tried) >= 1 + len(CLASSES_TINY)


def test_path_patching_from_chosen_senders(gqa, batch):
    full = path_patch(gqa, batch, receivers=[(2, 1)], receiver_input="q", at="read")
    some = path_patch(gqa, batch, receivers=[(2, 1)], receiver_input="q", at="read", senders=[(0, 2), (1, 3)])
    assert some.values[0, 2] == pytest.approx(full.values[0, 2].item(), abs=1e-10)
    assert some.values[1, 3] == pytest.approx(full.values[1, 3].item(), abs=1e-10)
    assert some.values.isnan().sum() == some.values.numel() - 2
    assert some.top(1)[0][0] in ({"layer": "0", "head": "2"}, {"layer": "1", "head": "3"})  # NaN is never on top
    with pytest.raises(Exception, match="senders"):
        path_patch(gqa, batch, receivers=[(2, 1)], senders=[(2, 0)])


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_the_study_runs_end_to_end_and_writes_strict_json(family, tmp_path):
    model = ioi_model(family, layers=6)
    out = run_ioi(model, LOOSE)
    text = write_json(out, tmp_path / "ioi.json")
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    for key in ("model", "n_prompts", "seed", "logit_diff", "circuit", "circuit_logit_diff", "faithfulness",
                "completeness", "minimality", "seconds", "intermediate", "evidence", "attention_patterns"):
        assert key in data, key
    assert list(data["circuit"]) == list(CLASSES) and data["n_prompts"] == 8
    found = [h for hs in data["circuit"].values() for h in hs]
    assert len(found) == len(set(found)) == data["n_circuit_heads"] == len(data["evidence"])
    assert set(data["minimality"]) == set(found)
    assert data["edges"] and all(e["source"] in found and e["target"] in found for e in data["edges"])
    assert data["faithfulness"] == pytest.approx(data["circuit_logit_diff"] / data["logit_diff"])
    for key in ("dla", "attention_end_to_IO", "induction_score", "resid_pre_by_position"):
        assert key in data["intermediate"], key
    assert all(data["circuit"].values()), data["circuit"]  # six layers are enough to fill every class
    for head, e in data["evidence"].items():  # each head passed its class's test
        if e["class"] == "name_mover":
            assert e["dla"] > 0
        if e["class"] in ("s_inhibition", "induction", "duplicate_token", "previous_token"):
            assert e["path_effect"] <= 0


def test_settings_are_checked():
    from mechscope import InputError

    with pytest.raises(InputError, match="receiver_positions"):
        Settings(receiver_positions="S2")
    with pytest.raises(InputError, match="n_path"):
        Settings(n=8, n_path=9)


def test_a_screen_that_checks_every_sender_is_the_exact_study():
    model = ioi_model("llama-gqa", layers=6)
    exact = run_ioi(model, LOOSE)
    everything = run_ioi(model, Settings(**{**LOOSE.__dict__, "screen": "atp", "screen_top": 1000}))
    assert everything["circuit"] == exact["circuit"] and everything["edges"] == exact["edges"]
    for key, screen in everything["screen"].items():
        assert screen["checked"] == screen["senders"] and screen["sampled"] == 0
        torch.testing.assert_close(torch.tensor(everything["intermediate"][key]["values"]),
                                   torch.tensor(exact["intermediate"][key]["values"]), atol=1e-6, rtol=0)
    assert exact["screen"] is None


def test_a_screen_path_patches_only_its_top_and_sample():
    model = ioi_model("llama-gqa", layers=6)
    out = run_ioi(model, Settings(**{**LOOSE.__dict__, "screen": "atp", "screen_top": 3, "screen_sample": 2}))
    for key, screen in out["screen"].items():
        values = torch.tensor(out["intermediate"][key]["values"], dtype=torch.float64)  # [layer, head]
        estimate = torch.tensor(out["intermediate"][f"{key}_estimate"]["values"], dtype=torch.float64)
        checked = ~values.isnan()
        assert screen["checked"] == min(3, screen["senders"])
        assert screen["sampled"] == min(2, screen["senders"] - screen["checked"])
        assert int(checked.sum()) == screen["checked"] + screen["sampled"]
        top = estimate.abs().flatten().argsort(descending=True)[:3]
        assert checked.flatten()[top].all()  # the three largest |estimates| are path-patched exactly
        unchecked = screen["largest_unchecked_estimate"]
        assert unchecked is None or unchecked <= estimate.abs().flatten()[top].min()
    from mechscope.report import render

    page = render(json.loads(write_json(out)))
    assert "What the screen path-patched" in page and "not path-patched: see the screen below" in page


def test_screen_settings_are_checked():
    from mechscope import InputError

    with pytest.raises(InputError, match="screen is None"):
        Settings(screen="acdc")
    with pytest.raises(InputError, match="screen_top"):
        Settings(screen="atp", screen_top=0)
