"""Real models from the offline zoo: logits equal plain `transformers`, hooks hold at full size, and
the models do IOI. The first run fetches the models (about 20 s, 60 s and 70 s); later runs load in
seconds."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import EAGER_SITES, assert_relatively_close
from mechscope.cli import DEMO_PROMPTS
from mechscope.models import zoo

pytestmark = pytest.mark.real

PROMPTS = [p for p, _, _ in DEMO_PROMPTS]


def _logits(model, prompts):
    with torch.no_grad():
        return model(model.to_tokens(prompts))


def _assert_logits_equal_plain(model, plain):
    tokens = model.to_tokens(PROMPTS)
    last = model.last_positions(PROMPTS)
    with torch.no_grad():
        ours = model(tokens)
        theirs = plain(input_ids=tokens).logits
    for i, n in enumerate(last.tolist()):  # real positions; padding is not compared
        # The same float32 weights through the same code: only kernel choice can differ (a GGUF load
        # and a safetensors load may lay tensors out differently), about 1e-7 of the logits' scale.
        assert_relatively_close(ours[i, : n + 1], theirs[i, : n + 1], 1e-5, "float32, same computation")


def test_gemma_logits_equal_plain_transformers_on_the_zoo_files(gemma3):
    """Plain transformers on the zoo's own files (the GGUF's dequantized copy): the loader changes
    nothing. (Reading Gemma's GGUF again would cost a minute here; the GGUF route itself is checked
    on SmolLM2 below, and the copy's hashes on every load.)"""
    plain = AutoModelForCausalLM.from_pretrained(zoo.model_dir("gemma3-270m") / "hf").eval()
    _assert_logits_equal_plain(gemma3, plain)


def test_qwen_coder_logits_equal_plain_transformers_on_the_zoo_files(qwen_coder):
    """The third zoo model: Qwen2 with grouped-query attention (14 heads, 2 key/value heads), biases on
    q, k, v and an output matrix of its own (not tied to the embeddings)."""
    cfg = qwen_coder.cfg
    assert (cfg.family, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_model) == ("llama", 24, 14, 2, 896)
    hf = qwen_coder.hf
    assert hf.get_output_embeddings().weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()
    plain = AutoModelForCausalLM.from_pretrained(zoo.model_dir("qwen2.5-coder-0.5b") / "hf").eval()
    _assert_logits_equal_plain(qwen_coder, plain)


def test_attribution_patching_over_every_head_of_the_largest_model(qwen_coder):
    """AtP over all 24 x 14 heads from one forward and backward; the head it ranks first, patched
    exactly, moves the logit difference the way AtP says (a linear estimate of a real effect)."""
    from mechscope.patching import activation_patch, attribution_patch
    from mechscope.tasks import ContrastiveBatch, ioi

    batch = ContrastiveBatch.from_records(qwen_coder, ioi(8, seed=4, model=qwen_coder))
    with torch.enable_grad():
        atp = attribution_patch(qwen_coder, batch, sites=["head_z"])["head_z"].values  # [layer, head]
    assert atp.shape == (24, 14) and atp.isfinite().all()
    layer, head = divmod(int(atp.abs().argmax()), 14)
    with torch.no_grad():
        exact = activation_patch(qwen_coder, batch, site="head_z", layers=[layer], heads=[head]).values  # [1, 1]
    assert exact.item() * atp[layer, head].item() > 0 and abs(exact.item()) > 0.05


def test_load_a_gguf_file_directly(smollm2):
    """A .gguf path loads its dequantized copy, found by the file's sha256 (here: the zoo's own copy of
    this very file, so nothing is converted twice); transformers' own GGUF reader on the file is the
    reference for that copy (Gemma's is checked above)."""
    from transformers import AutoModelForCausalLM

    import mechscope

    path = zoo.model_dir("smollm2-135m") / zoo.ZOO["smollm2-135m"].gguf_name
    direct = mechscope.load_model(path)
    assert direct.cfg.model_name == str(path) and direct.cfg.family == "llama"
    assert direct.cfg.n_layers == 30 and direct.cfg.n_heads == 9 and direct.cfg.n_kv_heads == 3
    assert zoo.gguf_copy(path) == zoo.model_dir("smollm2-135m") / "hf"
    assert torch.equal(_logits(direct, PROMPTS), _logits(smollm2, PROMPTS))
    plain = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    _assert_logits_equal_plain(smollm2, plain)  # plain transformers reading the GGUF itself


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3", "qwen_coder"])
def test_prefers_the_indirect_object(fixture, request):
    model = request.getfixturevalue(fixture)
    logits = _logits(model, PROMPTS)
    last = model.last_positions(PROMPTS)
    diffs = []
    for i, (_, io, s) in enumerate(DEMO_PROMPTS):
        final = logits[i, last[i]]
        diffs.append((final[model.to_single_token(io)] - final[model.to_single_token(s)]).item())
    assert all(d > 0 for d in diffs), diffs
    assert sum(diffs) / len(diffs) > 1.5, diffs


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3", "qwen_coder"])
def test_hooks_on_the_real_model(fixture, request):
    model = request.getfixturevalue(fixture)
    cfg = model.cfg
    tokens = model.to_tokens(PROMPTS[:2])
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: not n.endswith(EAGER_SITES))
        assert torch.equal(logits, model(tokens))
    assert cache["k", 0].shape == (2, tokens.shape[1], cfg.n_kv_heads, cfg.d_head)
    assert cfg.n_kv_heads < cfg.n_heads  # both zoo models use grouped-query attention
    final = cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    # Summing ~2 n_layers float32 components of the residual stream in another order than the model:
    # rounding of about n_layers * 6e-8 of the stream's scale.
    assert_relatively_close(cache.decompose_resid().sum(0), final, 1e-5, "float32 sums of 2 n_layers terms")
    for layer in (0, cfg.n_layers - 1):
        bias = model.adapter.b_O(layer) if model.adapter.attn_post_norm is None else None
        total = cache["result", layer].sum(2) + (bias if bias is not None else 0)
        # Per-head products W_O[h] z[h] summed over heads against one matmul over all of d_model:
        # float32 dot products of length n_heads * d_head, reordered; Gemma's post-norm rescales both.
        assert_relatively_close(total, cache["attn_out", layer], 1e-5, "float32 reordered dot products")


def test_second_fetch_is_a_no_op(smollm2):
    weights = zoo.model_dir("smollm2-135m") / "hf" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    zoo.fetch("smollm2-135m")
    assert weights.stat().st_mtime_ns == before


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_dla_and_detectors_on_the_real_model(fixture, request):
    from mechscope.analysis import direct_logit_attribution, head_scores, logit_lens
    from mechscope.tasks import ContrastiveBatch, ioi

    model = request.getfixturevalue(fixture)
    batch = ContrastiveBatch.from_records(model, ioi(6, seed=2, model=model))
    comps = direct_logit_attribution(model, batch, by="component")
    lens = logit_lens(model, batch)
    # RMSNorm: no bias, so the components add up to the logit difference; float32 sums over ~60 terms
    assert_relatively_close(comps.values.sum(), lens.values[-1], 1e-5, "float32 sum of the components")
    assert lens.values[-1] > 1.0  # both models solve IOI
    scores = head_scores(model)
    assert scores["induction"].values.max() > 0.5 and scores["previous_token"].values.max() > 0.5


def test_knockouts_on_the_real_model(smollm2):
    from mechscope.analysis.circuit import faithfulness
    from mechscope.tasks import ContrastiveBatch, ioi

    batch = ContrastiveBatch.from_records(smollm2, ioi(20, seed=1, model=smollm2))
    assert batch.groups is not None and len(set(batch.groups)) > 5
    every = [(l, h) for l in range(smollm2.cfg.n_layers) for h in range(smollm2.cfg.n_heads)]
    assert faithfulness(smollm2, batch, every).ratio == pytest.approx(1.0, abs=1e-5)
    empty = faithfulness(smollm2, batch, [])
    assert empty.model_logit_diff > 2.0 and abs(empty.ratio) < 0.3  # no head left to carry the names
