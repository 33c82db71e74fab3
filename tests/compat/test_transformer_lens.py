"""mechscope against TransformerLens itself: one tiny model, wrapped by both (TransformerLens 4.3's
TransformerBridge on its own copy), every shared hook, cache method and patching function compared,
and each deliberate difference pinned here with its reason.

The bridge runs in compatibility mode with `fold_ln` (TransformerLens's default, so that its
`apply_ln_to_stack` and `W_U` mean what its users know) and without the centering and value-bias
folds, which change the residual stream's parts themselves (each write minus its mean), not only
the coordinates. The bridge forces eager attention, whose softmax Hugging Face takes in float32
even in a float64 model: the tolerance is float32's on values of order 1.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_batch, tiny_model

tl = pytest.importorskip("transformer_lens")
pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("no_grad")]

CLOSE = dict(atol=1e-5, rtol=1e-5)  # eager float32 softmax inside a float64 model (see above)


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def pair(request, tmp_path_factory):
    """(mechscope's model, TransformerLens's bridge on a deep copy of the same weights)."""
    from transformers import AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    model = tiny_model(request.param)
    where = tmp_path_factory.mktemp(request.param)
    model.hf.config.save_pretrained(where)  # the bridge reads its config (and tokenizer) from a path
    model.tokenizer.save_pretrained(where)
    bridge = TransformerBridge.boot_transformers(str(where), hf_model=copy.deepcopy(model.hf), dtype=torch.float64,
                                                 tokenizer=AutoTokenizer.from_pretrained(where))
    bridge.enable_compatibility_mode(disable_warnings=True, center_writing_weights=False, center_unembed=False,
                                     fold_value_biases=False)
    return model, bridge


@pytest.fixture(scope="module")
def caches(pair):
    model, bridge = pair
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 9))
    ours_logits, ours = model.run_with_cache(tokens, names_filter=lambda n: True)
    theirs_logits, theirs = bridge.run_with_cache(tokens)
    theirs.compute_head_results()  # TransformerLens stores hook_result only when asked (as mechscope's names_filter)
    torch.testing.assert_close(ours_logits, theirs_logits, **CLOSE)
    return model, bridge, ours, theirs


def test_every_shared_hook_has_the_same_value(caches):
    model, _, ours, theirs = caches
    shared = [name for name in ours if name in theirs.cache_dict]
    assert len(shared) >= 15 * model.cfg.n_layers  # residual, attention, MLP and norm sites of every layer
    for name in shared:  # RMSNorm's scale is float32 here, as Hugging Face computes it; float64 there
        expected = theirs[name]
        if name.endswith("hook_attn_scores"):  # a hidden key: the mask's value as the model adds it, not -inf
            expected = expected.masked_fill(expected == -torch.inf, torch.finfo(expected.dtype).min)
        torch.testing.assert_close(ours[name], expected, **CLOSE, check_dtype=False, msg=name)
    # TransformerLens's shorthand reaches the same activations in both.
    for key in [("resid_pre", 1), ("scale", 1, "ln1"), ("k", -1, None), "k1", "scale2ln2", "scale", ("post", 0),
                ("attn", 1), ("result", 2), "embed"]:
        torch.testing.assert_close(ours[key], theirs[key], **CLOSE, check_dtype=False, msg=str(key))


def _final_norm_weight(model) -> torch.Tensor:
    from mechscope.models.adapters.base import norm_weight

    a = model.adapter
    return norm_weight(a.norm_kind, a.module(a.final_norm))


def _layer_norm_weight(model, layer: int, mlp_input: bool) -> torch.Tensor:
    from mechscope.models.adapters.base import norm_weight

    a = model.adapter
    path = a.mlp_norm if mlp_input and a.mlp_norm != a.attn_norm else a.attn_norm
    return norm_weight(a.norm_kind, a.module(path, layer))


def _same(model, bridge, ours, theirs, *, apply_ln: bool, layer, mlp_input: bool = False, recompute: bool = False):
    """Stacks (or (stack, labels)) of the two caches are the same: raw stacks equal; normalized at
    the final norm, their products with each one's W_U (TransformerLens's has the norm's weight
    folded in; a recomputed norm's bias goes to its b_U); normalized at a layer's norm, ours is
    TransformerLens's times that norm's weight (folded into the layer's W_Q, W_K, W_V, W_in)."""
    (a, la), (b, lb) = ours, theirs
    assert la == lb and a.shape == b.shape
    n = model.cfg.n_layers
    final = layer in (None, -1, n)
    if not apply_ln:
        torch.testing.assert_close(a, b, **CLOSE)
    elif final:
        bias_mine = model.b_U if recompute and model.b_U is not None else 0
        bias_theirs = bridge.b_U if recompute else 0
        torch.testing.assert_close(a @ model.W_U + bias_mine, b @ bridge.W_U + bias_theirs, **CLOSE)
    else:
        torch.testing.assert_close(a, b * _layer_norm_weight(model, layer, mlp_input), **CLOSE)


LAYERS = [None, -1, 0, 1, 2, 3, -2]  # -2: the layer before the final stream (TransformerLens takes only -1)


def _both(ours, theirs, method: str, **kw):
    """(ours, TransformerLens's) of one cache method, the layer written as TransformerLens takes it."""
    layer, n = kw["layer"], ours.model.cfg.n_layers
    tl_kw = dict(kw, layer=layer if layer is None or layer >= -1 else n + 1 + layer)
    return getattr(ours, method)(**kw), getattr(theirs, method)(**tl_kw)


@pytest.mark.parametrize("apply_ln", [False, True])
def test_cache_methods_agree(caches, apply_ln):
    model, bridge, ours, theirs = caches
    n = model.cfg.n_layers
    for layer in LAYERS:
        final = layer in (None, -1, n)
        same = dict(apply_ln=apply_ln, layer=n if final else layer % (n + 1))
        for incl_mid, mlp_input, pos_slice in [(False, False, None), (True, False, -1), (False, True, (1, 5)),
                                               (True, True, [0, 3])]:
            if final and mlp_input:
                continue
            kw = dict(layer=layer, incl_mid=incl_mid, apply_ln=apply_ln, pos_slice=pos_slice, mlp_input=mlp_input,
                      return_labels=True)
            _same(model, bridge, *_both(ours, theirs, "accumulated_resid", **kw), mlp_input=mlp_input,
                  recompute=final, **same)
            for mode in ("all", "attn", "mlp"):
                kw = dict(layer=layer, mlp_input=mlp_input, mode=mode, apply_ln=apply_ln, pos_slice=pos_slice,
                          incl_embeds=mode == "all", return_labels=True)
                if len(ours.decompose_resid(**kw)[1]) == 0:  # nothing to stack: empty here, an error in TL
                    assert ours.decompose_resid(**kw)[0].shape[0] == 0
                    continue
                _same(model, bridge, *_both(ours, theirs, "decompose_resid", **kw), mlp_input=mlp_input, **same)
            for expand in (False, True):
                kw = dict(layer=layer, mlp_input=mlp_input, expand_neurons=expand, apply_ln=apply_ln,
                          pos_slice=pos_slice, return_labels=True)
                _same(model, bridge, *_both(ours, theirs, "get_full_resid_decomposition", **kw),
                      mlp_input=mlp_input, **same)
        for remainder in ([False, True] if layer != 0 else [False]):
            kw = dict(layer=layer, return_labels=True, incl_remainder=remainder, pos_slice=-1, apply_ln=apply_ln)
            _same(model, bridge, *_both(ours, theirs, "stack_head_results", **kw), **same)
            if layer is not None:
                kw = dict(layer=layer, neuron_slice=[1, 4], return_labels=True, incl_remainder=remainder,
                          apply_ln=apply_ln)
                _same(model, bridge, *_both(ours, theirs, "stack_neuron_results", **kw), **same)


def test_logit_attrs_activations_and_batch_slices(caches):
    model, bridge, ours, theirs = caches
    stack = ours.decompose_resid(pos_slice=-1)
    answer, wrong = torch.tensor([5, 7]), torch.tensor([9, 11])
    torch.testing.assert_close(ours.logit_attrs(stack, answer, wrong, pos_slice=-1),
                               theirs.logit_attrs(stack, answer, wrong, pos_slice=-1), **CLOSE)
    full = ours.accumulated_resid()
    torch.testing.assert_close(ours.logit_attrs(full, answer), theirs.logit_attrs(full, answer), **CLOSE)
    torch.testing.assert_close(ours.stack_activation("pattern", 2), theirs.stack_activation("pattern", 2), **CLOSE)
    one_ours, one_theirs = ours.apply_slice_to_batch_dim(1), theirs.apply_slice_to_batch_dim(1)
    assert one_ours.has_batch_dim is one_theirs.has_batch_dim is False
    _same(model, bridge, one_ours.decompose_resid(apply_ln=True, return_labels=True),
          one_theirs.decompose_resid(apply_ln=True, return_labels=True), apply_ln=True, layer=None)
    # Unembedding directions: TransformerLens's W_U carries the final norm's weight and, after a
    # LayerNorm (which centers what it reads), is centered along d_model.
    mine, tl_dirs = model.tokens_to_residual_directions(answer) * _final_norm_weight(model), \
        bridge.tokens_to_residual_directions(answer)
    if model.adapter.norm_kind.startswith("layernorm"):
        mine, tl_dirs = mine - mine.mean(-1, keepdim=True), tl_dirs - tl_dirs.mean(-1, keepdim=True)
    torch.testing.assert_close(mine, tl_dirs, **CLOSE)


def test_deliberate_differences(caches):
    """Where mechscope differs on purpose, the difference is exactly the one its docstring gives."""
    model, bridge, ours, theirs = caches
    n = model.cfg.n_layers
    # A remainder before layer 0 is the stream entering layer 0 (the embeddings), not the final stream.
    torch.testing.assert_close(ours.stack_head_results(0, incl_remainder=True)[0], ours["resid_pre", 0])
    torch.testing.assert_close(theirs.stack_head_results(0, incl_remainder=True)[0], theirs["resid_post", n - 1])
    # apply_ln_to_stack multiplies by the norm's weight, which TransformerLens folds into W_U.
    x = ours["resid_post", n - 1][None]
    torch.testing.assert_close(ours.apply_ln_to_stack(x), theirs.apply_ln_to_stack(x) * _final_norm_weight(model),
                               **CLOSE)


def test_patching_agrees(pair):
    """Exact activation patching: TransformerLens's one-forward-per-component sweeps and mechscope's
    engine give the same table."""
    from transformer_lens import patching

    from mechscope.metrics import logit_diff, read_logits
    from mechscope.patching import activation_patch

    model, bridge = pair
    batch = tiny_batch(model)
    _, clean_cache = bridge.run_with_cache(batch.clean)
    corrupt = logit_diff(read_logits(bridge(batch.corrupt), batch), batch).mean()

    def metric(logits):
        return logit_diff(read_logits(logits, batch), batch).mean() - corrupt

    theirs = {"resid_pre": patching.get_act_patch_resid_pre(bridge, batch.corrupt, clean_cache, metric),
              "head_z": patching.get_act_patch_attn_head_out_all_pos(bridge, batch.corrupt, clean_cache, metric),
              "head_v": patching.get_act_patch_attn_head_v_all_pos(bridge, batch.corrupt, clean_cache, metric)}
    for site, table in theirs.items():  # k/v per key/value head in both (TransformerLens 4.3 too)
        ours = activation_patch(model, batch, site=site, per_position=site == "resid_pre").values
        torch.testing.assert_close(ours, table.to(ours), **CLOSE, msg=site)


def test_a_transformer_lens_metric_patches_alike(pair):
    """A metric written for TransformerLens (logits [batch, pos, d_vocab] -> scalar, read at -1),
    wrapped by `from_transformer_lens`, gives TransformerLens's table; one that reads another
    position is refused with a clear error."""
    from transformer_lens import patching

    from mechscope import InputError
    from mechscope.metrics import from_transformer_lens
    from mechscope.patching import activation_patch
    from mechscope.tasks import ContrastiveBatch

    model, bridge = pair
    batch = ContrastiveBatch.from_pairs(model, ["the cat sat", "one dog ran"], ["the rat sat", "one fox ran"],
                                        ["a", "b"], ["c", "d"])  # equal lengths: -1 is the read position
    rows = torch.arange(len(batch))

    def tl_logit_diff(logits):
        last = logits[:, -1]  # [batch, d_vocab]
        return (last[rows, batch.answer] - last[rows, batch.wrong]).mean()

    _, clean_cache = bridge.run_with_cache(batch.clean)
    corrupt = tl_logit_diff(bridge(batch.corrupt))
    table = patching.get_act_patch_attn_head_out_all_pos(bridge, batch.corrupt, clean_cache,
                                                          lambda logits: tl_logit_diff(logits) - corrupt)
    ours = activation_patch(model, batch, site="head_z", metric=from_transformer_lens(tl_logit_diff))
    torch.testing.assert_close(ours.values, table.to(ours.values), **CLOSE)
    with pytest.raises(InputError, match=r"sees only the read position: index it as logits\[:, -1\]"):
        activation_patch(model, batch, site="head_z", metric=from_transformer_lens(lambda logits: logits[:, 3, 0].mean()))
