"""Direct logit attribution, the logit lens and head detectors on tiny models of every family."""

import pytest
import torch

from conftest import approx_for, tiny_batch

from mechscope.analysis import direct_logit_attribution, head_scores, logit_lens
from mechscope.errors import InputError
from mechscope.metrics import logit_diff, read_logits
from mechscope.tasks import induction

pytestmark = pytest.mark.usefixtures("no_grad")


def _norm_bias_term(model, batch) -> float:
    """What the final norm's bias adds to the logit difference (LayerNorm families only)."""
    norm = model.adapter.module(model.adapter.final_norm)
    if getattr(norm, "bias", None) is None:
        return 0.0
    direction = (model.W_U[:, batch.answer] - model.W_U[:, batch.wrong]).T  # [batch, d_model]
    return (direction @ norm.bias).mean().item()


def test_component_dla_adds_up_to_the_logit_difference(model):
    batch = tiny_batch(model)
    dla = direct_logit_attribution(model, batch, by="component")
    actual = logit_diff(read_logits(model(batch.clean), batch), batch).mean().item()
    assert dla.labels["component"][0] == "embed" and dla.values.shape == (len(dla.labels["component"]),)
    assert dla.values.sum().item() + _norm_bias_term(model, batch) == pytest.approx(actual, **approx_for(model))


def test_head_dla_adds_up_to_each_layers_attention(model):
    batch = tiny_batch(model)
    heads = direct_logit_attribution(model, batch)
    comps = direct_logit_attribution(model, batch, by="component")
    assert heads.axes == ("layer", "head") and heads.values.shape == (model.cfg.n_layers, model.cfg.n_heads)
    _, cache = model.run_with_cache(batch.clean, names_filter=lambda n: n.endswith("hook_scale"))
    direction = (model.W_U[:, batch.answer] - model.W_U[:, batch.wrong]).T  # [batch, d_model]
    for layer in range(model.cfg.n_layers):
        bias = model.adapter.b_O(layer) if model.adapter.attn_post_norm is None else None
        bias_part = 0.0
        if bias is not None:  # the output bias is no head's: DLA leaves it out
            biased = cache.apply_ln_to_stack(bias.expand(*batch.clean.shape, -1)[None])[0]
            bias_part = (biased[torch.arange(2), batch.read_pos] * direction).sum(-1).mean().item()
        attn = comps.values[comps.labels["component"].index(f"{layer}_attn_out")].item()
        assert heads.values[layer].sum().item() + bias_part == pytest.approx(attn, **approx_for(model))


def test_logit_lens(model):
    batch = tiny_batch(model)
    lens = logit_lens(model, batch)
    actual = logit_diff(read_logits(model(batch.clean), batch), batch).mean().item()
    assert lens.values.shape == (model.cfg.n_layers + 1,) and lens.labels["layer"][-1] == "final_post"
    assert lens.values[-1].item() == pytest.approx(actual, abs=1e-10)
    _, cache = model.run_with_cache(batch.clean, names_filter=["blocks.1.hook_resid_pre"])
    resid = cache["resid_pre", 1][torch.arange(2), batch.read_pos]  # [batch, d_model]
    by_hand = logit_diff(model.logits_from_resid(resid), batch).mean().item()
    assert lens.values[1].item() == pytest.approx(by_hand, abs=1e-10)


def test_detectors_find_planted_heads(model):
    """Heads made to attend exactly like each kind of head score 1 for that kind."""
    length, prefix = 6, 0
    n_pos = prefix + 2 * length
    q = torch.arange(n_pos)
    plant = torch.zeros(3, n_pos, n_pos, dtype=torch.float64)
    plant[0, q, (q - 1).clamp(min=0)] = 1  # previous token
    plant[1, q, torch.where(q >= length, q - length, q)] = 1  # duplicate token
    plant[2, q, torch.where(q >= length, q - length + 1, q)] = 1  # induction

    def planted(act, hook):
        act = act.clone()
        act[:, :3] = plant
        return act

    assert induction(model, 2, length=length)[1] == prefix  # the byte tokenizer adds no BOS
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", planted)]):
        scores = head_scores(model, n=3, length=length)
    assert scores["previous_token"].values[1, 0] == pytest.approx(1.0)
    assert scores["duplicate_token"].values[1, 1] == pytest.approx(1.0)
    assert scores["induction"].values[1, 2] == pytest.approx(1.0)
    assert scores["induction"].values[1, 0] == pytest.approx(0.0)
    for result in scores.values():
        assert result.values.shape == (model.cfg.n_layers, model.cfg.n_heads)
        assert (result.values >= 0).all() and (result.values <= 1 + 1e-6).all()

    # TransformerLens's scale (detect_head, "mul"): the same attention mass over every query, from a
    # dense detection pattern written out here
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", planted)]):
        tl = head_scores(model, n=3, length=length, scale="all_queries")
        tokens, _ = induction(model, 3, length=length)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    n_pos = tokens.shape[1]
    detection = torch.zeros(n_pos, n_pos, dtype=torch.float64)
    detection[torch.arange(1, n_pos), torch.arange(n_pos - 1)] = 1  # previous token
    pattern = cache["pattern", 1]  # [batch, head, q, k]
    want = (pattern * detection).sum((-1, -2)).mean(0) / n_pos  # every row sums to 1
    torch.testing.assert_close(tl["previous_token"].values[1], want.to(tl["previous_token"].values))
    with pytest.raises(InputError, match="all_queries"):
        head_scores(model, scale="tl")


def test_induction_tokens(model):
    tokens, prefix = induction(model, 4, length=5, seed=1)
    assert tokens.shape == (4, prefix + 10) and tokens.dtype == torch.long
    assert torch.equal(tokens[:, prefix:prefix + 5], tokens[:, prefix + 5:])
    assert torch.equal(tokens, induction(model, 4, length=5, seed=1)[0])
    assert not set(tokens[:, prefix:].flatten().tolist()) & set(model.tokenizer.all_special_ids)


def test_dla_a_chunk_of_prompts_at_a_time_equals_one_pass(model):
    batch = tiny_batch(model)
    for by in ("head", "component"):
        whole = direct_logit_attribution(model, batch, by=by)
        torch.testing.assert_close(direct_logit_attribution(model, batch, by=by, chunk=1).values, whole.values,
                                   atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="chunk at least 1"):
        direct_logit_attribution(model, batch, chunk=0)
