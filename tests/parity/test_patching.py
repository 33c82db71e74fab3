"""The fast patching engine equals the naive method (one full forward per component) on every family,
site and direction, with prompts of different lengths in one batch."""

import pytest
import torch

from conftest import EXACT, exact_for, FAMILIES, tiny_batch, tiny_model
from mechscope.metrics import logit_diff, read_logits
from mechscope.patching import SITES, activation_patch
from mechscope.tasks import ContrastiveBatch

pytestmark = pytest.mark.usefixtures("no_grad")


def naive_patch(model, batch, site, direction, per_position):
    """One full forward per component, written plainly."""
    spec = SITES[site]
    source, target = (batch.clean, batch.corrupt) if direction == "denoise" else (batch.corrupt, batch.clean)
    n_heads = model.cfg.n_kv_heads if spec.kv else model.cfg.n_heads
    heads = range(n_heads) if spec.per_head else [None]
    positions = range(batch.clean.shape[1]) if per_position else [None]
    base = logit_diff(read_logits(model(target), batch), batch).mean()
    out = torch.zeros(model.cfg.n_layers, len(heads), len(positions), dtype=torch.float64)
    for layer in range(model.cfg.n_layers):
        name = spec.hook_name(layer)
        _, cache = model.run_with_cache(source, names_filter=[name])
        src = cache[name]
        for hi, head in enumerate(heads):
            for pi, pos in enumerate(positions):
                def hook(act, _):
                    act = act.clone()
                    if site == "head_pattern":  # [batch, head, q_pos, k_pos]
                        act[:, head] = src[:, head] if pos is None else act[:, head]
                        if pos is not None:
                            act[:, head, pos] = src[:, head, pos]
                    elif spec.per_head:  # [batch, pos, head, ...]
                        if pos is None:
                            act[:, :, head] = src[:, :, head]
                        else:
                            act[:, pos, head] = src[:, pos, head]
                    elif pos is None:  # [batch, pos, d_model]
                        act[:] = src
                    else:
                        act[:, pos] = src[:, pos]
                    return act

                logits = model.run_with_hooks(target, fwd_hooks=[(name, hook)])
                out[layer, hi, pi] = logit_diff(read_logits(logits, batch), batch).mean() - base
    return out


CASES = [(f, s, d, False) for f in FAMILIES for s in SITES for d in ("denoise", "noise")]
CASES += [(f, s, d, True) for f in FAMILIES for s in SITES for d in ("denoise", "noise")]


@pytest.mark.parametrize("family, site, direction, per_position", CASES)
def test_fast_engine_equals_naive_reference(family, site, direction, per_position):
    model = tiny_model(family)
    if site == "resid_mid" and model.cfg.parallel_residual:
        pytest.skip("no resid_mid with a parallel residual stream")
    batch = tiny_batch(model)
    fast = activation_patch(model, batch, site=site, direction=direction, per_position=per_position, memory_mb=1)
    slow = naive_patch(model, batch, site, direction, per_position)
    # Patterns exist only in eager attention; the naive baseline runs SDPA.
    torch.testing.assert_close(fast.values.reshape(slow.shape), slow, **exact_for(model, eager=site == "head_pattern"))
    assert fast.values.abs().max() > 1e-3  # patching did something


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_clean_into_clean_changes_nothing(family):
    model = tiny_model(family)
    b = tiny_batch(model)
    same = ContrastiveBatch.from_pairs(model, b.clean_prompts, b.clean_prompts, ["a", "b"], ["c", "d"])
    for site in ("head_z", "resid_pre", "head_pattern"):
        result = activation_patch(model, same, site=site, per_position=True)
        assert result.values.abs().max() < 1e-10, site


@pytest.mark.parametrize("family", FAMILIES)
def test_denoising_the_whole_residual_stream_restores_the_clean_metric(family):
    model = tiny_model(family)
    result = activation_patch(model, tiny_batch(model), site="resid_pre")
    torch.testing.assert_close(result.normalized(), torch.ones(model.cfg.n_layers, dtype=torch.float64), **EXACT)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma3"])
def test_denoising_every_head_at_once_equals_denoising_attn_out(family):
    """All heads' z of a layer make its attention output (plus a bias the two runs share); Gemma 3's
    post-attention norm is no exception either, but its head results are not z's linear images."""
    model = tiny_model(family)
    batch = tiny_batch(model)
    layer = 1
    _, clean = model.run_with_cache(batch.clean, names_filter=f"blocks.{layer}.attn.hook_z")  # SDPA, as patching
    all_heads = model.run_with_hooks(batch.corrupt, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", lambda a, h: clean["z", layer])])
    attn = activation_patch(model, batch, site="attn_out", layers=[layer])
    got = logit_diff(read_logits(all_heads, batch), batch).mean() - attn.corrupt_metric
    torch.testing.assert_close(got, attn.values[0], **EXACT)


def test_chunking_does_not_change_the_numbers():
    model = tiny_model("llama-gqa")
    batch = tiny_batch(model)
    one = activation_patch(model, batch, site="head_z", per_position=True, memory_mb=1)
    many = activation_patch(model, batch, site="head_z", per_position=True, memory_mb=4096)
    torch.testing.assert_close(one.values, many.values, **EXACT)


def test_transformer_lens_site_names_and_query_head_layout():
    """TransformerLens's site names ("z", "v") and hook names ("blocks.1.attn.hook_z": that layer) give
    the same numbers; per_query_head lays k/v out per query head, so head sites stack as in TL."""
    from mechscope.patching import attribution_patch
    from mechscope.patching.sites import resolve_site

    model = tiny_model("llama-gqa")  # 4 query heads, 2 key/value heads
    batch = tiny_batch(model)
    z = activation_patch(model, batch, site="head_z")
    assert torch.equal(activation_patch(model, batch, site="z").values, z.values)
    one = activation_patch(model, batch, site="blocks.1.attn.hook_z")
    assert one.labels["layer"] == ["1"] and torch.equal(one.values[0], z.values[1])
    assert resolve_site("blocks.12.hook_resid_pre")[1] == 12 and resolve_site("resid_pre")[1] is None
    v = activation_patch(model, batch, site="v")
    wide = activation_patch(model, batch, site="v", per_query_head=True)
    assert v.values.shape == (3, 2) and wide.values.shape == z.values.shape == (3, 4)
    assert wide.labels["head"] == ["0", "1", "2", "3"]
    assert torch.equal(wide.values[:, [0, 1]], v.values[:, [0, 0]]) and torch.equal(wide.values[:, 3], v.values[:, 1])
    torch.stack([z.values, wide.values])  # stacks, as TL's [site, layer, head]
    with torch.enable_grad():
        atp = attribution_patch(model, batch, sites=["z", "resid_pre"])
    assert set(atp) == {"z", "resid_pre"}  # keyed by the names given
    with pytest.raises(Exception, match="or a hook name such as blocks.0.attn.hook_z"):
        activation_patch(model, batch, site="blocks.x.attn.hook_z")


@pytest.mark.parametrize("family", FAMILIES)
def test_resuming_after_the_unchanged_prefix_changes_no_number(family, monkeypatch):
    """Each patched row runs only from the first position it changes (the patched one, or the first
    token where source and target differ), over the target's keys and values: the same numbers as
    running every position."""
    from mechscope.patching.exact import _first_difference
    from mechscope.patching.resume import LayerInputs

    model = tiny_model(family)
    batch = tiny_batch(model)
    assert (_first_difference(batch.clean, batch.corrupt) > 0).all()  # the pairs share a prefix
    monkeypatch.setattr("mechscope.patching.exact.PREFIX_WORTH", 0.0)  # skip it however short
    cases = [("head_z", False, "denoise"), ("resid_pre", True, "noise"), ("head_v", True, "denoise")]
    resumed = [activation_patch(model, batch, site=s, per_position=p, direction=d).values for s, p, d in cases]
    monkeypatch.setattr(LayerInputs, "resumable", property(lambda self: False))
    for (site, per_position, direction), fast in zip(cases, resumed):
        full = activation_patch(model, batch, site=site, per_position=per_position, direction=direction).values
        torch.testing.assert_close(fast, full, **exact_for(model))
        assert fast.abs().max() > 1e-3, site
