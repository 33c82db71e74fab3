"""Exact patching on smollm2-135m: the fast engine equals one full forward per component."""

import pytest

from mechscope.metrics import logit_diff, read_logits
from mechscope.patching import activation_patch
from mechscope.tasks import ContrastiveBatch, ioi


pytestmark = [pytest.mark.real, pytest.mark.usefixtures("no_grad")]


@pytest.mark.parametrize("site, per_position", [("head_z", False), ("head_k", False), ("resid_pre", True)])
def test_fast_equals_naive_on_ioi(smollm2, site, per_position):
    model = smollm2
    batch = ContrastiveBatch.from_records(model, ioi(4, seed=1, model=model))  # mixed templates and lengths
    layers = [0, 15, 29]
    fast = activation_patch(model, batch, site=site, per_position=per_position, layers=layers)
    base = logit_diff(read_logits(model(batch.corrupt), batch), batch).mean()
    hook_site = {"head_z": "attn.hook_z", "head_k": "attn.hook_k", "resid_pre": "hook_resid_pre"}[site]
    for li, layer in enumerate(layers):
        name = f"blocks.{layer}.{hook_site}"
        _, clean = model.run_with_cache(batch.clean, names_filter=[name])
        n = fast.values.shape[1]
        for j in ([1, 4] if per_position else range(n)):  # a few components, one full forward each
            def patch(act, _):
                act = act.clone()
                if per_position:
                    act[:, j] = clean[name][:, j]
                else:
                    act[:, :, j] = clean[name][:, :, j]
                return act

            logits = model.run_with_hooks(batch.corrupt, fwd_hooks=[(name, patch)])
            naive = logit_diff(read_logits(logits, batch), batch).mean() - base
            # Two float32 forwards with other batch shapes: rounding of about 1e-7 per logit, through
            # ~30 layers, scaled by the size of the logits (20 to 30 here).
            scale = read_logits(logits, batch).abs().max().item()
            assert abs(fast.values[li, j].item() - naive.item()) <= 5e-6 * scale, (layer, j, scale)
    assert fast.clean_metric > 1.0  # the model solves these prompts


def test_ioi_pairs_have_equal_lengths_for_a_real_tokenizer(smollm2):
    for r in ioi(30, seed=5, model=smollm2):
        assert len(smollm2.to_str_tokens(r["clean"])) == len(smollm2.to_str_tokens(r["corrupt"]))
