"""The positional study on a tiny random model with a trained BPE tokenizer (some study words one
token, others several, IOI names one token each): labels follow the words, the cross-template patch
equals a literal one-prompt-at-a-time reference, and the whole study runs and renders."""

import math

import pytest

from conftest import bpe_word_model
from mechscope.report import render
from mechscope.studies.positions import PositionSettings, cross_template, run_positions, word_lists
from mechscope.tasks.ioi import NAMES

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def bpe_model():
    return bpe_word_model()


def test_each_word_token_is_labelled_with_its_word_index(bpe_model):
    s = PositionSettings(n=6, n_words=5)
    data, texts, counts = word_lists(bpe_model, s)
    assert set(counts) - {1} and 1 in counts  # both one-token and longer words were drawn
    prefix = len(bpe_model._encode(s.prefix, None)[0])
    for row, labels, text in zip(data.tokens, data.labels, texts):
        assert (labels[:prefix] == -1).all()
        real = labels >= 0
        assert labels[real].tolist() == sorted(labels[real].tolist())  # words in order, each token once
        assert labels[real].unique().tolist() == list(range(5))
        for i, word in enumerate(text[len(s.prefix):].split()):
            assert bpe_model.tokenizer.decode(row[labels == i]) == " " + word


def literal_effect(model, target: str, source: str, heads: list[tuple[int, int]]) -> float:
    """One target and one source alone (no padding): the heads' z at the source's last position
    written into the target's last position; the drop in IO - S there."""
    io, s = [name for name in NAMES if name in target][:2]
    first = target.index(io) < target.index(s)
    io, s = (io, s) if first else (s, io)
    ids = lambda t: model.to_tokens(t)  # noqa: E731
    _, cache = model.run_with_cache(ids(source), names_filter=lambda name: name.endswith("hook_z"))
    hooks = []
    for layer in {l for l, _ in heads}:
        def put(z, hook, layer=layer):
            z = z.clone()
            for l, h in heads:
                if l == layer:
                    z[0, -1, h] = cache[f"blocks.{l}.attn.hook_z"][0, -1, h]
            return z
        hooks.append((f"blocks.{layer}.attn.hook_z", put))
    a, b = model.to_single_token(io), model.to_single_token(s)
    clean, patched = model(ids(target))[0, -1], model.run_with_hooks(ids(target), fwd_hooks=hooks)[0, -1]
    return ((clean[a] - clean[b]) - (patched[a] - patched[b])).item()


def test_cross_template_patching_equals_a_literal_reference(bpe_model):
    heads = [(1, 0), (2, 3)]
    out = cross_template(bpe_model, [f"{l}.{h}" for l, h in heads], n=4, seed=1)
    assert out["heads"] == ["1.0", "2.3"]
    for kind in ("same_template", "cross_template", "same_order"):
        for i in range(4):
            expected = literal_effect(bpe_model, out["prompts"]["target"][i], out["prompts"][kind][i], heads)
            assert out["effects"][kind][i] == pytest.approx(expected, abs=1e-9)
        assert out[f"{kind}_effect"] == pytest.approx(sum(out["effects"][kind]) / 4)
    target, cross = out["prompts"]["target"][0], out["prompts"]["cross_template"][0]
    assert target.split(" ")[0] != cross.split(" ")[0] or len(target) != len(cross)


def test_the_study_runs_and_its_report_renders(bpe_model):
    result = run_positions(bpe_model, PositionSettings(n=24, n_words=4, n_ioi=6), heads=["2.1"])
    layers = bpe_model.cfg.n_layers + 1
    assert result["layers"] == ["embed", "0", "1", "2"] and result["best_layer"] in result["layers"]
    for key in ("accuracy", "position_baseline", "random_init_control", "shuffled_labels"):
        assert len(result[key]) == layers and all(0 <= x <= 1 for x in result[key]), key
    assert len(result["per_index_f1"]) == 4 and len(result["confusion"]) == 4
    assert math.isfinite(result["cross_template_ratio"]) and result["causal"]["heads"] == ["2.1"]
    page = render(result)
    assert "Word positions in" in page and "Cross-template patching" in page
