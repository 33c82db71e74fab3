"""ContrastiveBatch from lists, records and JSONL; the IOI mini-generator; metrics; PatchResult."""

import json

import pytest
import torch

from conftest import tiny_model
from mechscope import InputError
from mechscope.metrics import answer_prob, kl_div, logit_diff, read_logits, resolve_metric
from mechscope.patching import PatchResult, activation_patch
from mechscope.tasks import ContrastiveBatch, ioi, tokenize_pairs


@pytest.fixture
def model():
    return tiny_model("gpt2")


def test_tokenize_pairs(model):
    clean, corrupt, last = tokenize_pairs(model, ["ab", "abcd"], ["xy", "wxyz"])
    assert clean.shape == corrupt.shape == (2, 4) and last.tolist() == [1, 3]
    with pytest.raises(InputError, match=r"pair 1: the clean prompt is 4 tokens and the corrupt one 3"):
        tokenize_pairs(model, ["ab", "abcd"], ["xy", "xyz"])
    with pytest.raises(InputError, match="2 clean prompts but 1 corrupt"):
        tokenize_pairs(model, ["ab", "cd"], ["xy"])


def test_batch_from_jsonl_names_the_bad_line(model, tmp_path):
    good = {"clean": "abc", "corrupt": "abd", "answer": "x", "wrong": "y"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "clean": "abcdef", "corrupt": "abcdeg"}) + "\n")
    batch = ContrastiveBatch.from_jsonl(model, path)
    assert len(batch) == 2 and batch.read_pos.tolist() == [2, 5] and not batch.equal_lengths
    assert batch.answer.tolist() == [model.to_single_token("x")] * 2
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": "xy"}) + "\n")
    with pytest.raises(InputError, match=r"p.jsonl:2: the answer 'xy' is 2 tokens"):
        ContrastiveBatch.from_jsonl(model, path)
    path.write_text(json.dumps({**good, "corrupt": "abdd"}) + "\n")
    with pytest.raises(InputError, match=r"p.jsonl:1: the clean prompt is 3 tokens and the corrupt one 4"):
        ContrastiveBatch.from_jsonl(model, path)
    path.write_text('{"clean": "abc"}\n')
    with pytest.raises(InputError, match=r"p.jsonl:1: missing answer, corrupt, wrong"):
        ContrastiveBatch.from_jsonl(model, path)
    path.write_text("not json\n")
    with pytest.raises(InputError, match=r"p.jsonl:1: not valid JSON"):
        ContrastiveBatch.from_jsonl(model, path)


def test_ioi_generator(model):
    import re

    from mechscope.tasks.ioi import ABBA, BABA, NAMES

    assert len(BABA) == len(ABBA) == 15 and len(NAMES) >= 50
    records = ioi(40, seed=3)
    assert records == ioi(40, seed=3) and records != ioi(40, seed=4)
    count = lambda name, text: len(re.findall(re.escape(name) + r"\b", text))  # noqa: E731 - " Dan" is in " Daniel"
    for r in records:
        io, s, clean = r["answer"], r["wrong"], r["clean"]
        assert io != s and count(s, clean) == 2 and count(io, clean) == 1
        assert count(io, r["corrupt"]) == 0 and count(s, r["corrupt"]) == 0  # ABC: three other names
        order = r["template"].split("-")[0]  # BABA: the subject comes first
        assert (clean.index(s) < clean.index(io)) == (order == "BABA")
    assert {r["template"].split("-")[0] for r in records} == {"BABA", "ABBA"}
    for r in ioi(20, seed=1, corrupt="flip"):  # S2 replaced by IO
        assert count(r["answer"], r["corrupt"]) == 2 and count(r["wrong"], r["corrupt"]) == 1
    assert all(r["clean"].startswith("Then,") and r["template"] == "BABA-0" for r in ioi(5, templates=[0]))
    batch = ContrastiveBatch.from_records(model, [{"clean": "ab", "corrupt": "cd", "answer": "a", "wrong": "b",
                                                   "template": "BABA-1"}])
    assert batch.groups == ("BABA-1",)
    with pytest.raises(InputError, match="too few single-token names"):
        ioi(2, model=model)  # a byte tokenizer has no single-token names (equal lengths: tests/real)
    with pytest.raises(InputError, match="unknown templates"):
        ioi(2, templates=["CBBA-1"])
    with pytest.raises(InputError, match="corrupt must be"):
        ioi(2, corrupt="swap")


def test_metrics(model):
    batch = ContrastiveBatch.from_pairs(model, ["ab", "cd"], ["xb", "yd"], ["a", "b"], ["c", "d"])
    logits = torch.randn(3, 2, model.cfg.d_vocab)  # [variant, batch, d_vocab]
    a, w = batch.answer, batch.wrong
    assert torch.allclose(logit_diff(logits, batch)[1], logits[1, [0, 1], a] - logits[1, [0, 1], w])
    assert torch.allclose(answer_prob(logits, batch)[2], logits[2].softmax(-1)[[0, 1], a])
    assert torch.allclose(kl_div(logits[0], batch, reference=logits[0]), torch.zeros(2), atol=1e-6)
    assert (kl_div(logits[1], batch, reference=logits[0]) > 0).all()
    full = torch.randn(2, 2, model.cfg.d_vocab)
    assert torch.equal(read_logits(full, batch), full[:, 1])
    with pytest.raises(ValueError, match="unknown metric 'acc'"):
        resolve_metric("acc", full[:, 1])


def test_patch_result_round_trip_and_views(model, tmp_path):
    batch = ContrastiveBatch.from_pairs(model, ["the cat", "a dog"], ["the rat", "a fox"], ["a", "b"], ["c", "d"])
    result = activation_patch(model, batch, site="head_z", per_position=True)
    assert result.axes == ("layer", "head", "pos") and result.labels["pos"][0] == "0"  # lengths differ: indices
    again = PatchResult.from_json(result.to_json(tmp_path / "r.json"))
    assert torch.equal(again.values, result.values) and again.labels == result.labels
    assert PatchResult.from_json(tmp_path / "r.json").site == "head_z"
    frame = result.to_frame()
    assert len(frame) == result.values.numel() and list(frame.columns) == ["layer", "head", "pos", "value", "normalized"]
    (labels, value), *_ = result.top(3)
    assert abs(value) == result.values.abs().max().item()
    assert result.values[int(labels["layer"]), int(labels["head"]), int(labels["pos"].split(":")[0])] == value
    torch.testing.assert_close(result.normalized(), result.values / (result.clean_metric - result.corrupt_metric))
    assert len(result.plot().data) == 1
    with pytest.raises(ValueError, match="values have shape"):
        PatchResult(**{**result.__dict__, "values": torch.zeros(2)})


def test_patch_bad_input(model):
    batch = ContrastiveBatch.from_pairs(model, ["ab"], ["xb"], ["a"], ["c"])
    with pytest.raises(InputError, match="unknown patching site 'head_x'; choose one of resid_pre"):
        activation_patch(model, batch, site="head_x")
    with pytest.raises(InputError, match="direction must be"):
        activation_patch(model, batch, site="head_z", direction="up")
    with pytest.raises(InputError, match=r"layers \[7\] are out of range; this model has layers 0 .. 2"):
        activation_patch(model, batch, site="head_z", layers=[7])
    with pytest.raises(InputError, match="has no heads"):
        activation_patch(model, batch, site="resid_pre", heads=[0])
    custom = activation_patch(model, batch, site="head_z", heads=[1], metric=lambda logits, b: logits[:, 0])
    assert custom.values.shape == (3, 1) and custom.metric == "<lambda>"
    # Negative layers and heads count from the end, as in Python (and TransformerLens's cache).
    last = activation_patch(model, batch, site="head_z", layers=[-1], heads=[-1])
    assert last.labels == {"layer": ["2"], "head": [str(model.cfg.n_heads - 1)]}
    assert torch.equal(last.values, activation_patch(model, batch, site="head_z", layers=[2],
                                                     heads=[model.cfg.n_heads - 1]).values)
    from mechscope.discovery import Graph

    assert Graph.from_model(model, layers=[-1]).to_spec() == Graph.from_model(model, layers=[2]).to_spec()


def test_results_show_themselves_in_notebooks_as_their_report():
    import html

    from mechscope.result import Result

    r = Result(values=torch.tensor([[1.0, float("nan")]]), axes=("layer", "head"),
               labels={"layer": ["0"], "head": ["0", "1"]}, technique="dla", model="m", n_prompts=2, seconds=0.1)
    frame = r._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and 'sandbox="allow-scripts"' in frame
    page = html.unescape(frame.split('srcdoc="')[1].split('" style=')[0])
    assert page.startswith("<!DOCTYPE html>") and '"values":[[1.0,null]]' in page  # NaN: strict JSON null
    assert Result.from_json(r.to_json()).values[0, 1].isnan()
    from mechscope.report import Report

    assert Report(r.to_dict())._repr_html_() == frame
