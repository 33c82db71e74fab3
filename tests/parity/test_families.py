"""Every supported family, proven on a tiny random model of its own config class (float64, every
weight perturbed, options off their defaults where they could hide a bug): what a family must pass
to be listed as supported. The deep suite (every technique's own tests) runs on FAMILIES; the
families added after it pass these, in ALL_FAMILIES."""

import pytest
import torch

from conftest import ALL_FAMILIES, EAGER_SITES, HF_FLOAT32, byte_tokenizer, exact_for, tiny_batch, tiny_hf
from mechscope import HookedModel
from mechscope.models.adapters import ADAPTERS
from mechscope.models.adapters.base import norm_apply

pytestmark = pytest.mark.usefixtures("no_grad")
TOKENS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=ALL_FAMILIES)
def pair(request):
    """(the plain Hugging Face model, the same model wrapped in memory)."""
    hf = tiny_hf(request.param)
    return hf, HookedModel(hf, byte_tokenizer())


def test_every_family_in_the_tests_is_an_adapter():
    tested = {HookedModel(tiny_hf(f), byte_tokenizer()).cfg.family for f in ALL_FAMILIES}
    assert tested == {a.family for a in ADAPTERS}


def test_logits_are_plain_transformers_and_inert_hooks_change_nothing(pair):
    hf, model = pair
    plain = hf(input_ids=TOKENS).logits
    assert torch.equal(model(TOKENS), plain)
    inert = [(n, lambda act, hook: None) for n in model.hook_names if not n.endswith(EAGER_SITES)]
    assert torch.equal(model.run_with_hooks(TOKENS, fwd_hooks=inert), plain)
    own = hf.config._attn_implementation  # sdpa, or eager where the family has no other (Gemma 2)
    hf.config._attn_implementation = "eager"
    eager = hf(input_ids=TOKENS).logits
    hf.config._attn_implementation = own
    every = [(n, lambda act, hook: None) for n in model.hook_names]
    assert torch.equal(model.run_with_hooks(TOKENS, fwd_hooks=every), eager)


def test_every_hook_reads_what_the_module_computes(pair):
    """Heads' results sum to attn_out, z through W_O is attn_out, mlp.hook_post through the down
    projection is mlp_out, the residual stream is the sum of what is added to it, the norm before
    attention is its input over ln1.hook_scale, and mlp.hook_post is the activation of mlp.hook_pre
    (times mlp.hook_pre_linear, for gated MLPs)."""
    _, model = pair
    a, tol = model.adapter, exact_for(model)
    _, cache = model.run_with_cache(TOKENS, names_filter=lambda name: True)  # hook_result too
    for l in range(model.cfg.n_layers):
        attn_out = cache[f"blocks.{l}.hook_attn_out"]
        result = cache[f"blocks.{l}.attn.hook_result"]  # [batch, pos, head, d_model]
        torch.testing.assert_close(a.attn_out_from_results(l, result), attn_out, **tol)
        torch.testing.assert_close(a.attn_out_from_results(l, a.head_results(l, cache[f"blocks.{l}.attn.hook_z"])),
                                   attn_out, **tol)
        if a.attn_post_norm is None and f"blocks.{l}.mlp.hook_post" in model.hook_names:  # (not Gemma 3's
            # post-norm, nor a mixture of experts)
            w_out, b_out = a.mlp_out_affine(l)  # the down projection (times Granite's residual multiplier)
            torch.testing.assert_close(cache[f"blocks.{l}.mlp.hook_post"] @ w_out + b_out,
                                       cache[f"blocks.{l}.hook_mlp_out"], **tol)
        pre, post = cache[f"blocks.{l}.hook_resid_pre"], cache[f"blocks.{l}.hook_resid_post"]
        if model.cfg.parallel_residual:
            torch.testing.assert_close(pre + attn_out + cache[f"blocks.{l}.hook_mlp_out"], post, **tol)
        else:
            mid = cache[f"blocks.{l}.hook_resid_mid"]
            torch.testing.assert_close(pre + attn_out, mid, **tol)
            torch.testing.assert_close(mid + cache[f"blocks.{l}.hook_mlp_out"], post, **tol)
    for l in range(model.cfg.n_layers):  # the norms' scales and the MLP's pre-activations
        pre = cache[f"blocks.{l}.hook_resid_pre"]
        if a.attn_norm is None:  # OLMo-2: attention reads the stream itself, and there is no scale to name
            assert f"blocks.{l}.ln1.hook_scale" not in model.hook_names
        else:
            norm = a.module(a.attn_norm, l)
            torch.testing.assert_close(norm_apply(a.norm_kind, norm, pre, cache[f"blocks.{l}.ln1.hook_scale"]),
                                       norm(pre), **tol)
        mlp = a.module(a.down_proj.rsplit(".", 1)[0], l) if "." in a.down_proj else None
        if mlp is not None and f"blocks.{l}.mlp.hook_pre" in model.hook_names:
            act = next(getattr(mlp, n) for n in ("act_fn", "act", "activation_fn", "gelu_impl") if hasattr(mlp, n))
            post = act(cache[f"blocks.{l}.mlp.hook_pre"])
            if a.mlp_pre_linear is not None:
                post = post * cache[f"blocks.{l}.mlp.hook_pre_linear"]
            torch.testing.assert_close(post, cache[f"blocks.{l}.mlp.hook_post"], **tol)
    if "hook_pos_embed" in model.hook_names:  # per prompt, as in TransformerLens; embeddings sum to resid_pre
        assert cache["hook_pos_embed"].shape == (*TOKENS.shape, model.cfg.d_model)
        torch.testing.assert_close(cache["hook_embed"] + cache["hook_pos_embed"], cache["blocks.0.hook_resid_pre"], **tol)
    q, k = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_k"]
    assert q.shape == (*TOKENS.shape, model.cfg.n_heads, model.cfg.d_head)
    assert k.shape == (*TOKENS.shape, model.cfg.n_kv_heads, model.cfg.d_head)


def test_rotated_q_and_k_are_q_and_k_after_rotary(pair):
    """Writing another prompt's hook_rot_q|k into layer 1 is writing its hook_q|k there (same positions,
    so the same rotation): the rotated sites are exactly what attention uses."""
    _, model = pair
    if not model.adapter.rotary:
        assert "blocks.0.attn.hook_rot_q" not in model.hook_names
        return
    names = [f"blocks.1.attn.hook_{x}" for x in ("q", "k", "rot_q", "rot_k")]
    _, theirs = model.run_with_cache(TOKENS.flip(0), names_filter=names)
    hooks = [(n, lambda act, hook: theirs[hook.name].clone()) for n in names]
    plain, rot = model.run_with_hooks(TOKENS, fwd_hooks=hooks[:2]), model.run_with_hooks(TOKENS, fwd_hooks=hooks[2:])
    torch.testing.assert_close(rot, plain, **exact_for(model))
    assert not torch.allclose(rot, model(TOKENS))
    assert theirs[names[2]].shape == theirs[names[0]].shape and theirs[names[3]].shape == theirs[names[1]].shape
    rotates = getattr(model.adapter.module(model.adapter.attn, 1), "use_rope", True)  # SmolLM3's NoPE layers
    assert torch.allclose(theirs[names[2]], theirs[names[0]]) != bool(rotates)  # rotated, or not where it is not


def test_direct_logit_attribution_adds_up_to_the_logits(pair):
    """Every part of the final stream through the final norm (its cached scale) and W_U, plus the
    norm's bias and b_U: the logits (before Gemma 2's final soft-cap). W_U carries Cohere's logit scale."""
    hf, model = pair
    logits, cache = model.run_with_cache(TOKENS, names_filter=lambda n: not n.endswith(EAGER_SITES))
    direct = cache.decompose_resid(apply_ln=True) @ model.W_U  # [component, batch, pos, d_vocab]
    norm = model.adapter.module(model.adapter.final_norm)
    bias = getattr(norm, "bias", None)
    total = direct.sum(0) + (0 if bias is None else bias @ model.W_U) + (0 if model.b_U is None else model.b_U)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    torch.testing.assert_close(total if cap is None else torch.tanh(total / cap) * cap, logits, **exact_for(model))


def test_the_logits_of_some_tokens_are_those_of_every_token(pair):
    """logits_from_resid(tokens=): each prompt's chosen tokens' logits, as the full unembedding gives
    them (biases, Cohere's scale and Gemma 2's soft-cap included), through the narrow product and
    through the fallback for a head that is not a plain matrix."""
    hf, model = pair
    resid = torch.randn(3, 2, model.cfg.d_model, dtype=model.dtype, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([[5, 200, 7], [9, 9, 31]])  # [batch, t]
    full = model.logits_from_resid(resid)  # [3, batch, d_vocab]
    expected = full.gather(-1, tokens.expand(3, 2, 3))
    torch.testing.assert_close(model.logits_from_resid(resid, tokens), expected, **exact_for(model))

    class Wrapped(torch.nn.Linear):  # not exactly nn.Linear: the fallback
        pass

    head = model.adapter.unembed
    wrapped = Wrapped(head.in_features, head.out_features, bias=head.bias is not None, dtype=model.dtype)
    wrapped.load_state_dict(head.state_dict())
    hf.set_output_embeddings(wrapped)
    torch.testing.assert_close(model.logits_from_resid(resid, tokens), expected, **exact_for(model))


def test_per_head_inputs_are_what_each_head_reads(pair):
    """hook_q_input|k_input|v_input: read, resid_pre once per head; another prompt's resid_pre
    written into head h's copy is exactly that prompt's q (k, v) written into head h, and nothing
    else moves."""
    _, model = pair
    names = ["blocks.1.hook_resid_pre"] + [f"blocks.1.attn.hook_{x}" for x in "qkv"]
    _, theirs = model.run_with_cache(TOKENS.flip(0), names_filter=names)
    _, mine = model.run_with_cache(TOKENS, names_filter=lambda n: n.startswith("blocks.1.hook_"))
    for kind, heads in (("q", model.cfg.n_heads), ("k", model.cfg.n_kv_heads), ("v", model.cfg.n_kv_heads)):
        copies = mine[f"blocks.1.hook_{kind}_input"]  # [batch, pos, head, d_model]
        assert copies.shape == (*TOKENS.shape, heads, model.cfg.d_model)
        assert torch.equal(copies[:, :, -1], mine["blocks.1.hook_resid_pre"])
        h = heads - 1

        def into_input(act, hook):
            act[:, :, h] = theirs["blocks.1.hook_resid_pre"]

        def into_site(act, hook):
            act[:, :, h] = theirs[f"blocks.1.attn.hook_{kind}"][:, :, h]

        written = model.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.1.hook_{kind}_input", into_input)])
        torch.testing.assert_close(written, model.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.1.attn.hook_{kind}",
                                                                                      into_site)]), **exact_for(model))
        assert not torch.allclose(written, model(TOKENS)), kind


def test_attention_scores_are_what_the_softmax_takes(pair):
    """hook_attn_scores: its softmax is hook_pattern, and scores written so that head 0 sees only its
    own position (never masked, sliding windows included) give exactly what that pattern gives.
    GPT-OSS's scores end with each head's sink, which takes its share of the softmax."""
    _, model = pair
    _, cache = model.run_with_cache(TOKENS, names_filter=["blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern"])
    scores = cache["blocks.1.attn.hook_attn_scores"]  # [batch, head, q_pos, k_pos (+ 1 sink)]
    n_pos = TOKENS.shape[1]
    sinks = scores.shape[-1] - n_pos
    assert sinks == (model.cfg.family == "gpt_oss")
    probabilities = scores.softmax(-1, dtype=torch.float32).to(scores.dtype)[..., :n_pos]
    torch.testing.assert_close(probabilities, cache["pattern", 1], **HF_FLOAT32)  # a float32 softmax here
    own = torch.eye(n_pos, dtype=torch.bool)

    def own_position_scores(act, hook):  # the sink hidden too
        act[:, 0].masked_fill_(~torch.cat([own, own.new_zeros(n_pos, sinks)], -1), torch.finfo(act.dtype).min)

    def own_position_pattern(act, hook):
        act[:, 0] = own.to(act)

    by_scores = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.attn.hook_attn_scores", own_position_scores)])
    by_pattern = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.attn.hook_pattern", own_position_pattern)])
    torch.testing.assert_close(by_scores, by_pattern, **exact_for(model))
    assert not torch.allclose(by_scores, model(TOKENS))


def test_writing_every_activation_back_changes_nothing(pair):
    _, model = pair
    names = [n for n in model.hook_names if not n.endswith(EAGER_SITES)]
    logits, cache = model.run_with_cache(TOKENS, names_filter=names)
    back = model.run_with_hooks(TOKENS, fwd_hooks=[(n, lambda act, hook: cache[hook.name].clone()) for n in names])
    torch.testing.assert_close(back, logits, **exact_for(model))


def test_writes_act_and_in_place_edits_equal_returned_ones(pair):
    """Every site of layer 1 and every global site: an edit changes the logits, and `act.mul_`
    returning None gives exactly what returning `act * 0.9` gives."""
    _, model = pair
    base = model(TOKENS)

    def in_place(act, hook):
        act.mul_(0.9)

    for name in [n for n in model.hook_names if n.startswith("blocks.1.") or not n.startswith("blocks.")]:
        returned = model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda act, hook: act * 0.9)])
        edited = model.run_with_hooks(TOKENS, fwd_hooks=[(name, in_place)])
        assert not torch.allclose(returned, base), name
        assert torch.equal(edited, returned), name


def test_backward_hooks_see_the_gradient_of_what_a_site_adds_to(pair):
    """hook_attn_out and hook_mlp_out are added to the stream as they are: their gradients are those of
    the stream they are added to (resid_mid or resid_post), through flattened sites (OPT's MLP),
    scaled ones (Granite's) and post-norms alike."""
    _, model = pair
    seen = {}

    def keep(grad, hook):
        seen[hook.name] = grad.clone()

    names = ["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    mid = "blocks.1.hook_resid_post" if model.cfg.parallel_residual else "blocks.1.hook_resid_mid"
    with torch.enable_grad():
        model.run_with_hooks(TOKENS, bwd_hooks=[(n, keep) for n in {*names, mid}]).pow(2).sum().backward()
    torch.testing.assert_close(seen["blocks.1.hook_mlp_out"], seen["blocks.1.hook_resid_post"], **exact_for(model))
    torch.testing.assert_close(seen["blocks.1.hook_attn_out"], seen[mid], **exact_for(model))
    assert seen["blocks.1.hook_mlp_out"].shape == (*TOKENS.shape, model.cfg.d_model)


def test_patching_equals_the_naive_reference_and_attribution_runs(pair):
    from test_patching import naive_patch

    from mechscope.patching import activation_patch, attribution_patch

    _, model = pair
    batch = tiny_batch(model)
    for site in ("head_z", "resid_pre", "mlp_out"):
        fast = activation_patch(model, batch, site=site, memory_mb=1)
        slow = naive_patch(model, batch, site, "denoise", False)
        torch.testing.assert_close(fast.values.reshape(slow.shape), slow, **exact_for(model))
    for site, direction in (("head_k", "denoise"), ("resid_mid", "noise")):  # each row from its position on
        if site == "resid_mid" and model.cfg.parallel_residual:
            continue
        fast = activation_patch(model, batch, site=site, direction=direction, per_position=True)
        slow = naive_patch(model, batch, site, direction, True)
        torch.testing.assert_close(fast.values.reshape(slow.shape), slow, **exact_for(model))
    with torch.enable_grad():
        atp = attribution_patch(model, batch, sites=["head_z"])["head_z"]
    assert atp.values.shape == (model.cfg.n_layers, model.cfg.n_heads) and atp.values.isfinite().all()


def test_path_patching_at_one_position_equals_the_literal_method(pair):
    """One position per prompt: step 1 at that position alone, step 2 from it on."""
    from test_path_patching import literal_path_patch

    from mechscope.patching import path_patch

    _, model = pair
    batch = tiny_batch(model)
    last = model.cfg.n_layers - 1
    for receivers, receiver_input, at in (("logits", "q", "read"), ([(last, 0)], "k", torch.tensor([8, 11])),
                                          ([(last, 1), (1, 0)], "q", "read")):
        fast = path_patch(model, batch, receivers=receivers, receiver_input=receiver_input, at=at)
        slow = literal_path_patch(model, batch, receivers, receiver_input, at, "noise")
        torch.testing.assert_close(fast.values, slow, **exact_for(model))


def test_edge_patching_ends_at_the_clean_and_the_corrupt_run(pair):
    from mechscope.discovery import Evaluator, Graph
    from mechscope.metrics import read_logits

    _, model = pair
    batch = tiny_batch(model)
    ev = Evaluator(model, batch, Graph.from_model(model))
    out = ev.patcher.run(torch.tensor([[0] * ev.graph.n_edges, [1] * ev.graph.n_edges], dtype=torch.bool))
    torch.testing.assert_close(out[0], read_logits(model(batch.clean), batch), **exact_for(model))
    torch.testing.assert_close(out[1], read_logits(model(batch.corrupt), batch), **exact_for(model))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "olmoe"])
def test_the_router_site_is_the_routing_and_a_zeroed_expert_is_gone(family):
    """hook_router holds each token's top-k weights (k nonzero per token); zeroing an expert's column
    there gives exactly the model whose expert has a zero down projection (an independent ablation)."""
    hf = tiny_hf(family)
    model = HookedModel(hf, byte_tokenizer())
    k = hf.config.num_experts_per_tok
    _, cache = model.run_with_cache(TOKENS, names_filter=["blocks.0.mlp.hook_router"])
    route = cache["blocks.0.mlp.hook_router"]  # [batch, pos, expert]
    assert route.shape == (*TOKENS.shape, model.adapter.n_experts()) and ((route != 0).sum(-1) == k).all()
    assert (route[..., 1] != 0).any()  # expert 1 serves some tokens: its removal is a real change
    before = model(TOKENS)

    def drop(act, hook):
        act[..., 1] = 0

    ablated = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.mlp.hook_router", drop)])
    experts = hf.model.layers[0].mlp.experts
    experts.down_proj[1].zero_()
    if hasattr(experts, "down_proj_bias"):  # GPT-OSS's experts have biases
        experts.down_proj_bias[1].zero_()
    torch.testing.assert_close(ablated, hf(input_ids=TOKENS).logits, **exact_for(model))
    assert not torch.allclose(ablated, before)
