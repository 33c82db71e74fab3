"""Hooks change nothing unless they write, and what they write acts exactly where it should."""

import pytest
import torch
from conftest import EAGER_SITES, EXACT, exact_for, tiny_hf, tiny_model
from mechscope import HookedModel

pytestmark = pytest.mark.usefixtures("no_grad")


def _names(model: HookedModel, *, pattern: bool) -> list[str]:
    return [n for n in model.hook_names if n.endswith(EAGER_SITES) == pattern]


def test_inert_hooks_are_bitwise_equal_to_transformers(model, tokens):
    plain = model.hf(input_ids=tokens).logits
    inert = [(n, lambda act, hook: None) for n in _names(model, pattern=False)]
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=inert), plain)
    assert torch.equal(model(tokens), plain)


def test_inert_pattern_hooks_are_bitwise_equal_to_eager_transformers(family, tokens):
    """Hooking a pattern switches to eager attention; the result is the eager model, bit for bit."""
    model = tiny_model(family)
    eager = tiny_hf(family)
    eager.config._attn_implementation = "eager"
    expected = eager(input_ids=tokens).logits
    inert = [(n, lambda act, hook: None) for n in model.hook_names]
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=inert), expected)
    assert model.hf.config._attn_implementation == "sdpa"  # switched back


# Sites whose write path recomputes something the model computed its own way; equal to float error.
RECOMPUTED = ("hook_resid_mid", "hook_result", "hook_scale", "hook_q_input", "hook_k_input", "hook_v_input",
              *EAGER_SITES)


@pytest.mark.parametrize("pattern", [False, True], ids=["sdpa", "eager"])
def test_writing_back_cached_activations_changes_nothing(model, tokens, pattern):
    """Cached under the same attention implementation as the run it is written into."""
    names = _names(model, pattern=pattern)
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    for name in names:
        back = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook: cache[hook.name].clone())])
        if name.endswith(RECOMPUTED):
            torch.testing.assert_close(back, logits, **exact_for(model, eager=pattern), msg=name)
        else:
            assert torch.equal(back, logits), name


def _add(delta, head=None):
    def hook(act, _):
        act = act.clone()
        if head is None:
            act += delta
        else:
            act[:, :, head] += delta
        return act

    return hook


def test_equivalent_writes_agree(model, tokens):
    """Adding the same vector at sites that feed the same sum gives the same logits."""
    torch.manual_seed(0)
    d = model.cfg.d_model
    delta = torch.randn(d, dtype=torch.float64)
    run = lambda *hooks: model.run_with_hooks(tokens, fwd_hooks=list(hooks))  # noqa: E731
    close = lambda a, b: torch.testing.assert_close(a, b, **exact_for(model))  # noqa: E731

    base = run()
    via_attn = run(("blocks.1.hook_attn_out", _add(delta)))
    assert not torch.allclose(via_attn, base)  # the write was not ignored
    close(run(("blocks.1.attn.hook_result", _add(delta, head=2))), via_attn)
    if not model.cfg.parallel_residual:
        close(run(("blocks.1.hook_resid_mid", _add(delta))), via_attn)
    via_mlp = run(("blocks.0.hook_mlp_out", _add(delta)))
    close(run(("blocks.0.hook_resid_post", _add(delta))), via_mlp)
    close(run(("blocks.1.hook_resid_pre", _add(delta))), via_mlp)
    close(run(("hook_embed", _add(delta))), run(("blocks.0.hook_resid_pre", _add(delta))))
    zero_logits = run(("hook_logits", lambda act, hook: torch.zeros_like(act)))
    assert torch.equal(zero_logits, torch.zeros_like(base))


def test_z_write_equals_result_write(model, tokens):
    """Changing head h's z by dz changes the residual stream by dz @ W_O[h] (without post-norm)."""
    if model.adapter.attn_post_norm is not None:
        pytest.skip("Gemma's post-attention norm makes attention output nonlinear in z")
    torch.manual_seed(0)
    dz = torch.randn(model.cfg.d_head, dtype=torch.float64)
    dres = dz @ model.adapter.W_O(1)[3]
    a = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", _add(dz, head=3))])
    b = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_result", _add(dres, head=3))])
    torch.testing.assert_close(a, b, **EXACT)


def test_pattern_write_equals_z_write(model, tokens):
    """A written pattern P gives z = P @ v, exactly what writing that z directly gives."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1.attn"))
    v = cache["blocks.1.attn.hook_v"]  # [batch, pos, kv_head, d_head]
    v = v.repeat_interleave(model.cfg.n_heads // v.shape[2], dim=2)
    pattern = torch.tril(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.float64))
    pattern = (pattern / pattern.sum(-1, keepdim=True)).expand_as(cache["blocks.1.attn.hook_pattern"])
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    a = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda act, h: pattern.clone())])
    b = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", lambda act, h: z)])
    torch.testing.assert_close(a, b, **exact_for(model, eager=True))  # a: eager attention, b: SDPA


def test_qkv_writes_determine_z(model, tokens):
    """Writing another prompt's q, k and v into a layer reproduces that prompt's z there."""
    other = tokens.flip(0)
    names = [f"blocks.1.attn.hook_{x}" for x in ("q", "k", "v", "z")]
    _, theirs = model.run_with_cache(other, names_filter=names)
    got = {}
    hooks = [(n, lambda act, hook: theirs[hook.name].clone()) for n in names[:3]]
    hooks.append((names[3], lambda act, hook: got.setdefault("z", act)))
    model.run_with_hooks(tokens, fwd_hooks=hooks)
    torch.testing.assert_close(got["z"], theirs[names[3]], **EXACT)


def test_scale_write(model, tokens):
    """Doubling the final norm's scale halves the normalized stream (around the bias)."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
    doubled = model.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_scale", lambda act, h: act * 2)])
    norm = model.adapter.module(model.adapter.final_norm)
    bias = getattr(norm, "bias", None)
    normed = cache.apply_ln_to_stack(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])
    half = normed / 2 + (bias if bias is not None else 0)
    expected = model.adapter.unembed(half)
    torch.testing.assert_close(doubled, expected, **exact_for(model, eager=True))  # the cache ran eager


def test_mlp_post_write(model, tokens):
    """Zero neurons leave the MLP writing only its output bias (through Gemma's post-norm: zero)."""
    got = {}
    model.run_with_hooks(
        tokens,
        fwd_hooks=[
            ("blocks.0.mlp.hook_post", lambda act, h: torch.zeros_like(act)),
            ("blocks.0.hook_mlp_out", lambda act, h: got.setdefault("out", act)),
        ],
    )
    bias = getattr(model.adapter.module(model.adapter.down_proj, 0), "bias", None)
    expected = torch.zeros_like(got["out"]) + (bias if bias is not None else 0)
    torch.testing.assert_close(got["out"], expected)


def test_padding_leaves_real_positions_unchanged(model):
    prompts = ["a short one", "a much longer prompt than that"]
    tokens = model.to_tokens(prompts)
    last = model.last_positions(prompts)
    assert tokens.shape == (2, len(prompts[1].encode()))
    assert last.tolist() == [len(p.encode()) - 1 for p in prompts]
    batched, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    for i, prompt in enumerate(prompts):
        alone, alone_cache = model.run_with_cache(model.to_tokens(prompt), names_filter=lambda n: n.endswith("hook_z"))
        n = last[i] + 1
        torch.testing.assert_close(batched[i, :n], alone[0], **EXACT)
        torch.testing.assert_close(cache["z", 2][i, :n], alone_cache["z", 2][0], **EXACT)


def test_grouped_query_shapes():
    model = tiny_model("llama-gqa")
    _, cache = model.run_with_cache(torch.randint(0, 256, (3, 5)))
    assert model.cfg.n_kv_heads == 2 and model.cfg.n_heads == 4
    assert cache["blocks.0.attn.hook_q"].shape == (3, 5, 4, 16)
    assert cache["blocks.0.attn.hook_k"].shape == (3, 5, 2, 16)
    assert cache["blocks.0.attn.hook_v"].shape == (3, 5, 2, 16)
    assert cache["blocks.0.attn.hook_z"].shape == (3, 5, 4, 16)
    assert cache["blocks.0.attn.hook_pattern"].shape == (3, 4, 5, 5)


def test_wrapping_does_not_touch_the_model(family, tokens):
    hf = tiny_hf(family)
    before = hf(input_ids=tokens).logits
    HookedModel(hf)
    assert torch.equal(hf(input_ids=tokens).logits, before)
    assert not hf._forward_hooks and not hf._forward_pre_hooks


def test_in_place_edits_take_effect_as_returned_ones(model, tokens):
    """At every site of a layer and every global site: `act.mul_(0.9)` returning None gives exactly
    the logits that returning `act * 0.9` gives, and an inert read stays inert."""
    base = model(tokens)
    names = [n for n in model.hook_names if n.startswith("blocks.1.") or not n.startswith("blocks.")]

    def in_place(act, hook):
        act.mul_(0.9)

    for name in names:
        returned = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook: act * 0.9)])
        edited = model.run_with_hooks(tokens, fwd_hooks=[(name, in_place)])
        assert not torch.allclose(returned, base), name  # the edit matters
        assert torch.equal(edited, returned), name
    seen = []

    def read(act, hook):  # reads, even through views, edit nothing
        seen.append(act[..., :1].sum().item() + act.detach().abs().max().item())

    names = [n for n in names if not n.endswith(EAGER_SITES)]  # eager attention rounds otherwise
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[(n, read) for n in names]), base)
    assert len(seen) == len(names)


def test_resid_mid_carries_an_edit_of_attn_out_whatever_order_the_hooks_came_in(model, tokens):
    """Zeroing attention's output makes resid_mid equal resid_pre, seen by a resid_mid hook attached
    before or after the edit, and the MLP reads it: both orders give one result. (A resid_mid that
    was read at attention's output missed edits hooked after it: the MLP read the unedited stream.)"""
    if model.cfg.parallel_residual:
        pytest.skip("no resid_mid with a parallel residual stream")
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre"])
    results = []
    for order in (1, -1):
        seen = {}
        hooks = [("blocks.1.hook_attn_out", lambda act, hook: torch.zeros_like(act)),
                 ("blocks.1.hook_resid_mid", lambda act, hook: seen.setdefault("mid", act.clone()))][::order]
        results.append(model.run_with_hooks(tokens, fwd_hooks=hooks))
        assert torch.equal(seen["mid"], cache["blocks.1.hook_resid_pre"])
    assert torch.equal(results[0], results[1])
