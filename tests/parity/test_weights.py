"""The weights in TransformerLens's layout, against the modules and against forward passes: every
projection reproduces the model's own q/k/v, a head's OV applied to a residual vector is what the
head writes when it attends to that vector alone, W_in and W_out reproduce the MLP, and the
factored products and composition scores equal their materialised definitions."""

import pytest
import torch

from conftest import ALL_FAMILIES, byte_tokenizer, exact_for, tiny_hf
from mechscope import HookedModel
from mechscope.errors import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("no_grad")
TOKENS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=ALL_FAMILIES)
def model(request):
    return HookedModel(tiny_hf(request.param), byte_tokenizer())


def test_projections_reproduce_q_k_v(model):
    a, tol = model.adapter, exact_for(model)
    _, cache = model.run_with_cache(TOKENS, names_filter=lambda n: "hook_q" in n or "hook_k" in n or "hook_v" in n
                                    or "resid_pre" in n or "ln1" in n)
    w = model.weights
    for kind in "qkv":
        W, b = w.attention(kind)
        assert W.shape == (model.cfg.n_layers, model.cfg.n_heads if kind == "q" else model.cfg.n_kv_heads,
                           model.cfg.d_model, model.cfg.d_head)
        folded_W, folded_b = w.attention(kind, fold_norm=True)
        for l in range(model.cfg.n_layers):
            x = cache[f"blocks.{l}.hook_resid_pre"]
            mine = torch.einsum("bpd,hde->bphe", a.pre_norm(l)(x), W[l]) + b[l]  # (no norm: OLMo-2)
            post = a.qkv_projections()[kind][1]
            if post is not None and a.qk_norm_whole:  # OLMo-2, OLMoE: the q/k norm over all heads
                mine = a.module(post, l)(mine.flatten(-2)).unflatten(-1, mine.shape[-2:])
            elif post is not None:  # Qwen3 / Gemma 3: the per-head q/k norm after the projection
                mine = a.module(post, l)(mine)
            torch.testing.assert_close(mine, cache[f"blocks.{l}.attn.hook_{kind}"], **tol)
            if post is None:  # folded: the same from the normalised stream, before the norm's gain and bias
                scale = cache[f"blocks.{l}.ln1.hook_scale"] if a.attn_norm is not None else 1.0
                centred = x - x.mean(-1, keepdim=True) if a.norm_kind.startswith("layernorm") else x
                folded = torch.einsum("bpd,hde->bphe", centred / scale, folded_W[l]) + folded_b[l]
                torch.testing.assert_close(folded, cache[f"blocks.{l}.attn.hook_{kind}"], **tol)
    expanded, _ = w.attention("k", per_query_head=True)
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    assert expanded.shape[1] == model.cfg.n_heads
    assert torch.equal(expanded[:, group - 1], w.attention("k")[0][:, 0])  # query head group-1 reads kv head 0
    assert torch.equal(expanded[:, -1], w.attention("k")[0][:, -1])


def test_a_heads_ov_is_what_it_writes_when_it_attends_to_one_vector(model):
    """Every query attends to position 0 alone (a written one-hot pattern): head h then writes
    (norm(resid_pre[0]) @ W_V + b_V) @ W_O at every position, that is the OV circuit applied."""
    if model.adapter.attn_post_norm is not None:
        pytest.skip("Gemma's post-attention norm rescales what a head writes by all heads' sum")
    l, h = 1, model.cfg.n_heads - 1
    pos = TOKENS.shape[1]
    one_hot = torch.zeros(pos, pos, dtype=torch.float64)
    one_hot[:, 0] = 1
    got = {}
    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda act, hook: one_hot.expand_as(act).to(act).clone()),
             (f"blocks.{l}.attn.hook_result", lambda act, hook: got.setdefault("r", act)),
             (f"blocks.{l}.hook_resid_pre", lambda act, hook: got.setdefault("x", act))]
    model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    a, w = model.adapter, model.weights
    x0 = a.module(a.attn_norm, l)(got["x"][:, :1])  # [batch, 1, d_model]
    w_v, b_v = w.attention("v", per_query_head=True)
    ov = w.OV()  # maps row vectors: x @ W_V @ W_O
    want = x0[:, 0] @ ov.AB[l, h] + b_v[l, h] @ w.W_O[l, h]  # [batch, d_model]
    torch.testing.assert_close(got["r"][:, :, h], want[:, None].expand(-1, pos, -1), **exact_for(model, eager=True))


def test_mlp_weights_reproduce_the_mlp(model):
    a, w = model.adapter, model.weights
    if any(a.is_moe(l) for l in range(model.cfg.n_layers)):
        with pytest.raises(UnsupportedModelError, match="mixtures of experts"):
            w.W_in
        return
    _, cache = model.run_with_cache(TOKENS, names_filter=lambda n: "mlp.hook" in n or "resid" in n)
    W_in, W_out = w.W_in, w.W_out
    for l in range(model.cfg.n_layers):
        x = cache[f"blocks.{l}.hook_resid_{'pre' if model.cfg.parallel_residual else 'mid'}"]
        normed = a.pre_norm(l, mlp=True)(x)  # [batch, pos, d_model] (OLMo-2: the stream itself)
        d_normed = normed - normed[:1, :1]  # differences between tokens: the bias cancels
        for name, W in (("hook_pre", W_in), ("hook_pre_linear", w.W_gate_linear if a.mlp_pre_linear else None)):
            if W is None:
                continue
            pre = cache[f"blocks.{l}.mlp.{name}"]
            torch.testing.assert_close(d_normed @ W[l], pre - pre[:1, :1], **exact_for(model))
        post, down = cache[f"blocks.{l}.mlp.hook_post"], a.module(a.down_proj, l)
        bias, m = getattr(down, "bias", None), a.residual_multiplier or 1.0  # W_out carries Granite's multiplier
        torch.testing.assert_close(post @ W_out[l] + (0 if bias is None else bias * m), down(post) * m,
                                   **exact_for(model))


def test_factored_products_and_composition_scores_equal_their_definitions():
    model = HookedModel(tiny_hf("llama-gqa"), byte_tokenizer())
    w = model.weights
    ov, qk = w.OV(fold_norm=True), w.QK(fold_norm=True)
    assert ov.AB.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)
    torch.testing.assert_close(ov.norm(), ov.AB.flatten(-2).norm(dim=-1))
    torch.testing.assert_close(ov.singular_values(), torch.linalg.svdvals(ov.AB)[..., :model.cfg.d_head])
    v = torch.randn(model.cfg.d_model, dtype=torch.float64)
    torch.testing.assert_close(qk @ v, qk.AB @ v)
    for kind, reader in (("q", qk.AB), ("k", qk.AB.transpose(-1, -2)), ("v", ov.AB)):
        scores = w.composition_scores(kind)
        l1, h1, l2, h2 = 0, 1, 2, 3
        m = ov.AB[l1, h1] @ reader[l2, h2]
        want = m.norm() / (ov.AB[l1, h1].norm() * reader[l2, h2].norm())
        assert scores[l1, h1, l2, h2].item() == pytest.approx(want.item(), rel=1e-9)
        assert (scores[2, :, 0] == 0).all() and (scores[1, :, 1] == 0).all()  # only earlier -> later
    assert torch.equal(model.W_Q, w.attention("q")[0]) and model.W_O.shape == (3, 4, 16, 64)
    assert torch.equal(model.b_O, torch.zeros(3, 64, dtype=model.W_O.dtype))  # Llama's o_proj has no bias
