"""ActivationCache: indexing, and the residual-stream algebra that direct logit attribution uses."""

import pytest
import torch

from conftest import EXACT, exact_for

from mechscope import InputError

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


def test_transformer_lens_keys(model, tokens):
    """TransformerLens's shorthand: (name, layer, layer_type) tuples and "k6"-style strings."""
    _, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    assert cache["scale", 1, "ln1"] is cache["blocks.1.ln1.hook_scale"]
    assert cache["k", -1, None] is cache[f"blocks.{n - 1}.attn.hook_k"]
    assert cache["k1"] is cache["blocks.1.attn.hook_k"] and cache["scale1ln1"] is cache["blocks.1.ln1.hook_scale"]
    assert cache["scale"] is cache["ln_final.hook_scale"] and cache["attn", 0] is cache["pattern", 0]
    assert cache["post", 2] is cache["blocks.2.mlp.hook_post"]
    assert cache.stack_activation("resid_pre").shape == (n, *tokens.shape, model.cfg.d_model)
    assert torch.equal(cache.stack_activation("z", 2)[1], cache["z", 1])


def _entering(model, cache, layer: int, mlp_input: bool = False):
    n = model.cfg.n_layers
    if layer == n:
        return cache["resid_post", n - 1]
    return cache["resid_mid", layer] if mlp_input and not model.cfg.parallel_residual else cache["resid_pre", layer]


def test_stacks_sum_to_the_stream_entering_each_layer(model, tokens):
    """TransformerLens's layer convention (the layers before `layer`; -1 the final stream), and every
    decomposition adds up to the stream it decomposes: components, the remainder, the full one."""
    _, cache = model.run_with_cache(tokens)
    n, shape = model.cfg.n_layers, (*tokens.shape, model.cfg.d_model)
    assert cache.stack_head_results(0).shape == (0, *shape)  # no heads before layer 0: an empty stack
    assert cache.stack_head_results(-1).shape == (n * model.cfg.n_heads, *shape)
    for layer in range(n + 1):
        for mlp_input in (False, True) if layer < n else (False,):
            whole = _entering(model, cache, layer, mlp_input)
            torch.testing.assert_close(cache.decompose_resid(layer, mlp_input).sum(0), whole, **EXACT)
            full, labels = cache.get_full_resid_decomposition(layer, mlp_input, return_labels=True)
            assert full.shape[0] == len(labels) and labels[-1] == "bias"
            torch.testing.assert_close(full.sum(0), whole, **exact_for(model))  # Gemma's post-norm shares
            coarse = cache.get_full_resid_decomposition(layer, mlp_input, expand_neurons=False)
            torch.testing.assert_close(coarse.sum(0), whole, **exact_for(model))
        whole = _entering(model, cache, layer)
        heads = cache.stack_head_results(layer, incl_remainder=True)
        torch.testing.assert_close(heads.sum(0), whole, **EXACT)
        neurons = cache.stack_neuron_results(layer, neuron_slice=[0, 5], incl_remainder=True, return_labels=True)
        assert neurons[1][:2] == (["L0N0", "L0N5"] if layer else ["remainder"])
        torch.testing.assert_close(neurons[0].sum(0), whole, **EXACT)
    parts, labels = cache.decompose_resid(2, mode="attn", incl_embeds=False, return_labels=True)
    assert labels == ["0_attn_out", "1_attn_out"]
    stack, labels = cache.accumulated_resid(2, incl_mid=not model.cfg.parallel_residual, return_labels=True)
    assert labels == (["0_pre", "1_pre", "2_pre"] if model.cfg.parallel_residual
                      else ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre"])
    assert cache.accumulated_resid(0).shape == (1, *shape) and cache.accumulated_resid().shape == (n + 1, *shape)


def test_norms_of_each_layer(model, tokens):
    """apply_ln at a layer uses that layer's norm with its cached scale: the parts of the stream
    entering it, normalized, sum to the norm's output less its bias; the logit lens (final norm
    recomputed on each stream) ends at the logits."""
    logits, cache = model.run_with_cache(tokens)
    a = model.adapter
    for layer in range(model.cfg.n_layers):
        norm = a.module(a.attn_norm, layer)
        bias = getattr(norm, "bias", None)
        parts = cache.decompose_resid(layer, apply_ln=True)
        torch.testing.assert_close(parts.sum(0) + (0 if bias is None else bias), norm(cache["resid_pre", layer]),
                                   **exact_for(model))  # a linear fold of the norm
    lens = cache.accumulated_resid(apply_ln=True)  # [layer + 1, batch, pos, d_model]
    final = lens[-1] @ model.W_U + (0 if model.b_U is None else model.b_U)
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    torch.testing.assert_close(final if cap is None else torch.tanh(final / cap) * cap, logits, **EXACT)


def test_logit_attrs_and_batch_slices(model, tokens):
    """logit_attrs is the normalized stack times the tokens' unembedding directions; a cache sliced
    to one prompt (or with its batch axis removed) gives that prompt's rows of every stack."""
    _, cache = model.run_with_cache(tokens)
    stack = cache.decompose_resid()  # [component, batch, pos, d_model]
    answer, wrong = torch.tensor([5, 7]), torch.tensor([9, 11])
    attrs = cache.logit_attrs(stack[:, :, -1], answer, wrong, pos_slice=-1)  # [component, batch]
    direct = cache.apply_ln_to_stack(stack)[:, :, -1] @ model.W_U  # [component, batch, d_vocab]
    rows = torch.arange(2)
    torch.testing.assert_close(attrs, direct[:, rows, answer] - direct[:, rows, wrong], **EXACT)
    every_position = cache.logit_attrs(stack, answer)  # [component, batch, pos]: one token per prompt
    torch.testing.assert_close(every_position[:, :, -1], direct[:, rows, answer], **EXACT)
    assert model.tokens_to_residual_directions(5).shape == (model.cfg.d_model,)
    assert model.tokens_to_residual_directions(tokens).shape == (*tokens.shape, model.cfg.d_model)
    one = cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and one["resid_pre", 0].shape == tokens.shape[1:] + (model.cfg.d_model,)
    torch.testing.assert_close(one.stack_head_results(apply_ln=True), cache.stack_head_results(apply_ln=True)[:, 1],
                               **EXACT)
    single = cache.apply_slice_to_batch_dim([1]).remove_batch_dim()
    torch.testing.assert_close(single.decompose_resid(1, apply_ln=True), cache.decompose_resid(1, apply_ln=True)[:, 1],
                               **EXACT)
    with pytest.raises(InputError, match="one prompt"):
        cache.remove_batch_dim()
