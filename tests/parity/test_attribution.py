"""Attribution patching against exact patching where the first-order expansion is exact, its
gradients against finite differences, and AtP*'s pieces against their definitions."""

import pytest
import torch
from torch import nn

from conftest import EXACT, exact_for, byte_tokenizer, tiny_batch, tiny_hf, tiny_model
from mechscope import HookedModel
from mechscope.metrics import logit_diff, read_logits
from mechscope.patching import activation_patch, attribution_patch
from mechscope.patching.attribution import _target_pass
from mechscope.patching.diagnostics import compare, verify_top_k

LINEAR_FAMILIES = ["gpt2", "neox", "llama-gqa", "qwen2"]  # Gemma's post-attention norm is never linear


def linear_model(family: str) -> HookedModel:
    """One attention layer, a silenced MLP and no final norm: everything after the attention
    pattern is linear, so first-order estimates downstream of it are exact."""
    hf = tiny_hf(family)
    model = HookedModel(hf)
    a = model.adapter
    layers = a.layer_modules()
    del layers[1:]
    hf.config.num_hidden_layers = 1
    with torch.no_grad():
        a.module(a.down_proj, 0).weight.zero_()
    parent, _, name = a.final_norm.rpartition(".")
    setattr(hf.get_submodule(parent), name, nn.Identity())
    return HookedModel(hf, byte_tokenizer())


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("per_position", [False, True])
def test_atp_is_exact_on_a_linear_model(family, direction, per_position):
    model = linear_model(family)
    batch = tiny_batch(model)
    linear_sites = ["head_z", "head_v", "head_pattern", "head_result", "attn_out", "mlp_out", "resid_post"]
    estimates = attribution_patch(model, batch, sites=linear_sites, direction=direction, per_position=per_position)
    for site in linear_sites:
        exact = activation_patch(model, batch, site=site, direction=direction, per_position=per_position)
        # The attribution pass forms patterns (eager attention); exact patching of other sites runs SDPA.
        torch.testing.assert_close(estimates[site].values, exact.values, **exact_for(model, eager=True), msg=site)
    assert estimates["head_z"].values.abs().max() > 1e-3


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("per_position", [False, True])
def test_qk_fix_is_exact_when_only_the_softmax_is_nonlinear(family, per_position):
    """On the linear model, queries and keys act through the softmax alone: AtP* recomputes it
    exactly, so it equals exact patching of a single query or key, while plain AtP does not."""
    model = linear_model(family)
    batch = tiny_batch(model)
    star = attribution_patch(model, batch, sites=["head_q", "head_k"], method="atp*", per_position=per_position)
    plain = attribution_patch(model, batch, sites=["head_q", "head_k"], method="atp", per_position=per_position)
    for site in ("head_q", "head_k"):
        exact = activation_patch(model, batch, site=site, per_position=per_position)
        torch.testing.assert_close(star[site].values, exact.values, **exact_for(model, eager=True), msg=site)
        assert not torch.allclose(plain[site].values, exact.values, atol=1e-4), site


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa", "gemma3"])
@pytest.mark.parametrize("site", ["blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern", "blocks.0.hook_resid_post",
                                  "blocks.2.attn.hook_k"])
def test_gradients_equal_finite_differences(family, site):
    """The hooked gradient is autograd's; and it matches central differences in float64
    (sharply for GPT-2; Llama's and Gemma's RMSNorms compute in float32 whatever the model's dtype,
    and their norms curve sharply, which limits differences there to about two digits)."""
    model = HookedModel(tiny_hf(family).double(), tiny_model(family).tokenizer)
    batch = tiny_batch(model)
    run = _target_pass(model, batch, batch.corrupt, [site], "logit_diff", "denoise",
                       model(batch.clean), [None], None)
    grad = run["grads"][None][site]

    leaf = {}

    def as_leaf(act, hook):
        leaf["x"] = act.detach().requires_grad_(True)
        return leaf["x"]

    logits = model.run_with_hooks(batch.corrupt, fwd_hooks=[(site, as_leaf)])
    (autograd,) = torch.autograd.grad(logit_diff(read_logits(logits, batch), batch).mean(), [leaf["x"]])
    torch.testing.assert_close(grad, autograd, atol=1e-10, rtol=1e-10)  # a pattern's path recomputes P @ v

    torch.manual_seed(0)
    direction = torch.randn_like(grad)
    eps, rtol = (1e-5, 1e-6) if family == "gpt2" else (1e-4, 3e-2)

    def metric_at(t):
        with torch.no_grad():
            logits = model.run_with_hooks(batch.corrupt, fwd_hooks=[(site, lambda a, h: a + t * direction)])
        return logit_diff(read_logits(logits, batch), batch).mean()

    finite = (metric_at(eps) - metric_at(-eps)) / (2 * eps)
    torch.testing.assert_close((grad * direction).sum(), finite, atol=1e-9, rtol=rtol)


def test_graddrop_of_last_layer_nodes_is_their_atp_magnitude():
    """Dropping an earlier layer's gradient cannot touch a last-layer node, and dropping its own
    zeroes it: so its GradDrop score, (1/(L-1)) sum_l |c_l|, is exactly |AtP|."""
    model = tiny_model("llama-gqa")
    result = attribution_patch(model, tiny_batch(model), sites=["head_z"], method="atp*")["head_z"]
    graddrop = torch.tensor(result.extra["graddrop"], dtype=result.values.dtype)
    assert graddrop.shape == result.values.shape
    torch.testing.assert_close(graddrop[-1], result.values[-1].abs(), **EXACT)
    assert not torch.allclose(graddrop[0], result.values[0].abs())


def test_mixed_lengths_and_several_sites_from_the_same_passes():
    model = tiny_model("gemma3")
    batch = tiny_batch(model)
    assert not batch.equal_lengths
    results = attribution_patch(model, batch, sites=["head_z", "head_k", "resid_pre"], per_position=True)
    assert results["head_k"].values.shape == (3, 2, batch.clean.shape[1])  # per key/value head
    assert results["resid_pre"].axes == ("layer", "pos") and results["head_z"].technique == "atp"
    # positions past a prompt's end cannot change its read logits
    assert results["resid_pre"].values[:, -1].abs().max() > 0  # the longer prompt's last token counts


def test_compare_and_verify():
    model = tiny_model("llama-gqa")
    batch = tiny_batch(model)
    estimate = attribution_patch(model, batch, sites=["head_z"], method="atp*")["head_z"]
    exact = activation_patch(model, batch, site="head_z")
    agreement = compare(estimate, exact, k=3)
    assert -1 <= agreement.pearson <= 1 and 0 <= agreement.top_k_overlap <= 1 and len(agreement.worst) == 5
    assert compare(exact, exact).pearson == pytest.approx(1.0)
    flat = type(exact)(**{**exact.__dict__, "values": torch.zeros_like(exact.values)})  # a constant result
    assert "pearson undefined (one side is constant)" in str(compare(estimate, flat))
    check = verify_top_k(model, batch, estimate, 3, sample=4)
    assert len(check.top) == 3 and len(check.sample) == 4
    for row in check.top + check.sample:
        layer, head = int(row["component"]["layer"]), int(row["component"]["head"])
        assert row["exact"] == pytest.approx(exact.values[layer, head].item(), abs=1e-10)
    assert check.max_missed == max(abs(r["exact"]) for r in check.sample)
