"""ActivationCache: indexing, and the residual-stream algebra that direct logit attribution uses."""

import pytest
import torch

from conftest import EXACT, exact_for

pytestmark = pytest.mark.usefixtures("no_grad")


def test_indexing(model, tokens):
    _, cache = model.run_with_cache(tokens)
    assert torch.equal(cache["resid_pre", 1], cache["blocks.1.hook_resid_pre"])
    assert torch.equal(cache["pattern", -1], cache[f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern"])
    n = model.cfg.n_layers
    assert torch.equal(cache["resid_pre", -n], cache["resid_pre", 0])
    for layer in (n, -n - 1):  # past either end: an error, never another layer
        with pytest.raises(IndexError, match=f"layer {layer} is out of range for a {n}-layer model"):
            cache["resid_pre", layer]
    assert torch.equal(cache["embed"], cache["hook_embed"])
    assert ("z", 0) in cache and "blocks.0.attn.hook_z" in cache
    assert "blocks.0.attn.hook_result" not in cache  # large; only when asked for
    with pytest.raises(KeyError, match="was not cached"):
        cache["blocks.0.attn.hook_result"]
    with pytest.raises(KeyError, match="Closest valid names: blocks.0.hook_resid_pre"):
        cache["blocks.0.hook_resid_pr"]
    assert set(cache.keys()) == set(cache) and len(cache) == len(list(cache.items()))
    assert cache.to("cpu")["resid_pre", 0].device.type == "cpu"


def test_names_filter(model, tokens):
    _, only = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    assert list(only) == ["blocks.0.hook_resid_post"]
    _, some = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    assert len(some) == model.cfg.n_layers


def test_decompose_resid_sums_to_the_residual_stream(model, tokens):
    _, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    parts, labels = cache.decompose_resid(return_labels=True)
    assert parts.shape[0] == len(labels) == 1 + ("hook_pos_embed" in model.hook_names) + 2 * n
    torch.testing.assert_close(parts.sum(0), cache[f"blocks.{n - 1}.hook_resid_post"], **EXACT)
    torch.testing.assert_close(cache.decompose_resid(layer=2).sum(0), cache["resid_pre", 2], **EXACT)


def test_accumulated_resid(model, tokens):
    _, cache = model.run_with_cache(tokens)
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert stack.shape[0] == model.cfg.n_layers + 1 and labels[-1] == "final_post"
    assert torch.equal(stack[1], cache["resid_pre", 1])


def test_stack_head_results_matches_hooked_results(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
    from_hook, labels = cache.stack_head_results(return_labels=True)
    _, z_only = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    from_z = z_only.stack_head_results()
    assert from_hook.shape == (model.cfg.n_layers * model.cfg.n_heads, *tokens.shape, model.cfg.d_model)
    assert labels[:2] == ["L0H0", "L0H1"]
    torch.testing.assert_close(from_hook, from_z, **exact_for(model, eager=True))  # patterns cached: eager


def test_result_sums_to_attn_out(model, tokens):
    """Heads plus the output bias give hook_attn_out; for Gemma 3 the heads alone do (the
    post-attention norm is folded into each head's result, see adapters/gemma.py)."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
    for layer in range(model.cfg.n_layers):
        result = cache["result", layer]
        bias = model.adapter.b_O(layer) if model.adapter.attn_post_norm is None else None
        total = result.sum(2) + (bias if bias is not None else 0)
        torch.testing.assert_close(total, cache["attn_out", layer], **exact_for(model))  # Gemma: its norm


def test_direct_logit_attribution_sums_to_logits(model, tokens):
    """Folding the final norm into every component, then unembedding, adds up to the logits."""
    logits, cache = model.run_with_cache(tokens)
    parts = cache.decompose_resid(apply_ln=True)  # [component, batch, pos, d_model]
    direct = parts @ model.W_U  # [component, batch, pos, d_vocab]
    norm = model.adapter.module(model.adapter.final_norm)
    constant = 0
    if getattr(norm, "bias", None) is not None:
        constant = norm.bias @ model.W_U
    if model.b_U is not None:
        constant = constant + model.b_U
    torch.testing.assert_close(direct.sum(0) + constant, logits, **exact_for(model))  # the norm, folded


def test_stacks_at_one_position_per_prompt_are_the_full_stacks_there(model, tokens):
    """`positions=`: each prompt's one position, without building the [component, batch, pos, d_model] stack."""
    _, cache = model.run_with_cache(tokens)
    positions = torch.arange(tokens.shape[0]) % tokens.shape[1]  # a different position per prompt
    rows = torch.arange(tokens.shape[0])
    for stack in (cache.stack_head_results, cache.decompose_resid):
        for apply_ln in (False, True):
            full = stack(apply_ln=apply_ln)[:, rows, positions]  # [component, batch, d_model]
            torch.testing.assert_close(stack(apply_ln=apply_ln, positions=positions), full, **exact_for(model))
