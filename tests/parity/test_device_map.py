"""A model placed by accelerate with half its layers offloaded to disk (their weights on the meta
device between forwards, read back layer by layer) gives what the plain model gives: logits, every
cached activation, the weights, and the techniques that read weights as well as activations.
Float64, compared exactly: offloading moves weights, it does not round them.

And half precision: float16 and bfloat16 runs give finite results that say their dtype."""

from __future__ import annotations

import pytest
import torch

from conftest import saved_ioi_model
from mechscope import load_model
from mechscope.analysis.dla import direct_logit_attribution
from mechscope.discovery import discover
from mechscope.errors import InputError
from mechscope.patching import activation_patch, attribution_patch, path_patch
from mechscope.tasks import ContrastiveBatch, ioi

TECHNIQUES = {
    "exact head_z per position": lambda m, b: activation_patch(m, b, site="head_z", per_position=True),
    "exact resid_pre": lambda m, b: activation_patch(m, b, site="resid_pre"),
    "atp* head_k": lambda m, b: attribution_patch(m, b, sites=["head_k"], method="atp*")["head_k"],
    "path patching": lambda m, b: path_patch(m, b),
    "dla": lambda m, b: direct_logit_attribution(m, b),
    "eap-ig": lambda m, b: discover(m, b, method="eap-ig"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_ioi_model(tmp_path_factory.mktemp("llama-gqa"), layers=4)


@pytest.fixture(scope="module")
def plain(model_dir):
    return load_model(model_dir, dtype="float64")


@pytest.fixture(scope="module")
def offloaded(model_dir, plain, tmp_path_factory):
    """The embedding and layers 0-1 in memory; layers 2-3, the final norm and the unembedding on disk."""
    bytes_of = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    cap = bytes_of(plain.hf.model.embed_tokens) + 3 * bytes_of(plain.hf.model.layers[0])  # room for 2 (accelerate keeps one spare)
    model = load_model(model_dir, dtype="float64", device="auto", max_memory={"cpu": cap},
                       offload_folder=tmp_path_factory.mktemp("offload"))
    placed = model.hf.hf_device_map
    assert [placed[f"model.layers.{l}"] for l in range(4)] == ["cpu", "cpu", "disk", "disk"], placed
    assert model.hf.model.layers[3].self_attn.o_proj.weight.device.type == "meta"  # really offloaded
    return model


@pytest.fixture(scope="module")
def batch(plain):
    return ContrastiveBatch.from_records(plain, ioi(5, seed=0, model=plain))


def test_logits_and_every_cached_activation(plain, offloaded, batch):
    with torch.no_grad():
        logits, cache = plain.run_with_cache(batch.clean)
        logits_off, cache_off = offloaded.run_with_cache(batch.clean)
    assert torch.equal(logits_off, logits)
    assert sorted(cache_off.keys()) == sorted(cache.keys())
    for name in cache.keys():
        assert torch.equal(cache_off[name], cache[name]), name


def test_weights_read_back_from_disk(plain, offloaded):
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_O", "W_U", "W_E"):
        assert torch.equal(getattr(offloaded, name), getattr(plain, name)), name
    assert offloaded.hf.model.layers[3].self_attn.o_proj.weight.device.type == "meta"  # and back to disk after


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_techniques_equal_the_plain_model(plain, offloaded, batch, name):
    one, off = TECHNIQUES[name](plain, batch), TECHNIQUES[name](offloaded, batch)
    assert off.labels == one.labels
    torch.testing.assert_close(off.values, one.values, rtol=0, atol=1e-12)


def test_offload_options_need_a_device_map(model_dir, tmp_path):
    with pytest.raises(InputError, match="need device='auto'"):
        load_model(model_dir, max_memory={"cpu": 10**6})
    with pytest.raises(InputError, match="need device='auto'"):
        load_model(model_dir, offload_folder=tmp_path)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_finite_and_says_its_dtype(model_dir, dtype):
    model = load_model(model_dir, dtype=dtype)
    batch = ContrastiveBatch.from_records(model, ioi(4, seed=0, model=model))
    for name in ("exact resid_pre", "atp* head_k", "eap-ig"):
        result = TECHNIQUES[name](model, batch)
        assert result.values.isfinite().all() and result.extra["model_dtype"] == dtype, name
        assert result.values.dtype.itemsize >= 4  # measured and averaged at least in float32
