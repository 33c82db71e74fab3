"""Bad input to the library: one clear error naming what was wrong and what would work, raised before
the expensive work; never a traceback from inside the model or a silently wrong number."""

import math
import warnings

import pytest
import torch

from conftest import byte_tokenizer, tiny_batch, tiny_hf, tiny_model
from mechscope import InputError, ModelLoadError, load_model
from mechscope.models import sites
from mechscope.patching import activation_patch, attribution_patch, path_patch
from mechscope.report import render
from mechscope.tasks import ContrastiveBatch

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.mark.parametrize("tokens, message", [
    ([], "no prompts: give a string"),
    ("", "no tokens to run"),
    (torch.zeros(1, 0, dtype=torch.long), "no tokens to run (shape (1, 0))"),
    (torch.zeros(0, 5, dtype=torch.long), "no tokens to run (shape (0, 5))"),
])
def test_empty_input_is_refused_before_the_model(tokens, message):
    model = tiny_model("gpt2")  # its byte tokenizer adds no BOS: "" is no token at all
    for call in (model, model.run_with_cache, lambda t: model.run_with_hooks(t)):
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call(tokens)


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_a_prompt_longer_than_the_context_is_refused(family):
    model = tiny_model(family)
    assert model.cfg.n_ctx == 64
    model(torch.zeros(1, 64, dtype=torch.long))  # the whole context is fine
    with pytest.raises(InputError, match="65 tokens are more than .* context of 64 positions; shorten"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_a_batch_whose_logits_cannot_fit_in_memory_is_refused(monkeypatch):
    from mechscope.models import hooked

    model = tiny_model("gpt2")
    monkeypatch.setattr(hooked, "_available_memory", lambda: 2**20)  # 1 MiB left
    with pytest.raises(InputError, match=r"2000 prompts of 64 tokens need 0.3 GiB .* use fewer prompts"):
        model(torch.zeros(2000, 64, dtype=torch.long))  # 2000 * 64 * 300 float64 = 293 MiB
    model(torch.zeros(2, 8, dtype=torch.long))  # small runs are never refused


def test_the_answer_equal_to_the_wrong_answer_is_refused():
    model = tiny_model("gpt2")
    with pytest.raises(InputError, match="pair 1: the answer 'b' and the wrong answer 'b' are the same token"):
        ContrastiveBatch.from_pairs(model, ["ab", "cd"], ["ax", "cx"], ["a", "b"], ["c", "b"])


def test_a_metric_that_is_nan_is_refused_or_said():
    model = tiny_model("llama-gqa")
    batch = tiny_batch(model)
    nan = lambda logits, b: logits[..., 0] * math.nan  # noqa: E731
    for run in (lambda: activation_patch(model, batch, site="resid_pre", metric=nan),
                lambda: attribution_patch(model, batch, sites=["resid_pre"], metric=nan),
                lambda: path_patch(model, batch, metric=nan)):
        with pytest.raises(InputError, match="the metric <lambda> is nan on the clean run"):
            run()
    calls = {"n": 0}

    def sometimes(logits, b):  # finite for the two baselines, NaN for the first patched variant
        calls["n"] += 1
        value = logits[..., 0] - logits[..., 1]
        return value * math.nan if calls["n"] == 3 else value

    with pytest.warns(UserWarning, match="was not finite for 1 of 3 patched components"):
        result = activation_patch(model, batch, site="resid_pre", metric=sometimes, memory_mb=0)
    assert result.values.isnan().sum() == 1


def test_unknown_metric_and_direction_are_input_errors():
    model = tiny_model("gpt2")
    batch = tiny_batch(model)
    with pytest.raises(InputError, match="unknown metric 'bogus'; use one of logit_diff"):
        activation_patch(model, batch, site="resid_pre", metric="bogus")
    with pytest.raises(InputError, match="direction must be 'denoise'"):
        activation_patch(model, batch, site="resid_pre", direction="up")


@pytest.mark.parametrize("record, message", [
    (123, "record 0: expected an object"),
    (None, "record 0: expected an object"),
    ({"clean": ["a"], "corrupt": "b", "answer": "a", "wrong": "b"}, '"clean" must be a non-empty string, not list'),
    ({"clean": "", "corrupt": "", "answer": "a", "wrong": "b"}, '"clean" must be a non-empty string, not an empty'),
    ({"clean": "ab", "corrupt": "ac", "answer": None, "wrong": "b"}, '"answer" must be a non-empty string'),
])
def test_bad_records(record, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        ContrastiveBatch.from_records(tiny_model("gpt2"), [record])


def test_a_hook_returning_another_dtype_is_said_once():
    model = tiny_model("gpt2")  # float64
    sites._CAST_WARNED.clear()
    tokens = torch.zeros(1, 4, dtype=torch.long)
    as_float32 = lambda act, hook: act.float()  # noqa: E731
    with pytest.warns(UserWarning, match=r"returned torch.float32; the model runs in torch.float64, so it is cast"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", as_float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", as_float32)])  # said once


def test_cuda_on_a_machine_without_it_is_refused_before_loading(tmp_path, monkeypatch):
    tiny_hf("gpt2").save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ModelLoadError, match="device 'cuda' asks for CUDA, which this machine lacks"):
        load_model(tmp_path, device="cuda")
    with pytest.raises(ModelLoadError, match="'tpu9' is not a device"):
        load_model(tmp_path, device="tpu9")


def test_load_errors_name_the_real_cause(tmp_path, monkeypatch):
    tiny_hf("gpt2").save_pretrained(tmp_path / "mine")
    byte_tokenizer().save_pretrained(tmp_path / "mine")
    weights = tmp_path / "mine" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "mine")
    assert "models fetch" not in str(err.value)  # the user's own folder is not the zoo's
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty local hub cache
    with pytest.raises(ModelLoadError, match="the zoo alias 'gpt2' is the hub model 'openai-community/gpt2'"):
        load_model("gpt2")
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 10)
    with pytest.raises(ModelLoadError, match="t.gguf is not a readable GGUF file .*download it again"):
        load_model(truncated)


def test_report_data_cannot_close_or_comment_out_its_script():
    from mechscope.result import Result

    nasty = "</script><!--<script>"
    page = render(Result(values=torch.ones(1), axes=("layer",), labels={"layer": [nasty]}, technique=nasty,
                         model="m", n_prompts=1, seconds=0.0))
    data = page.split('id="ms-data">')[1].split("</script>")[0]
    assert "<" not in data and "\\u003c!--\\u003cscript>" in data


def test_ioi_log_names_key_value_heads_as_such():
    from conftest import ioi_model
    from mechscope.studies.ioi import _receiver_name

    model = ioi_model("llama-gqa")  # 4 query heads, 2 key/value heads
    assert _receiver_name(model, (2, 1), "q") == "2.1"
    assert _receiver_name(model, (2, 1), "v") == "kv head 2.1 (read by 2.2 2.3)"


def test_outputs_are_written_together_or_not_at_all(tmp_path, monkeypatch):
    """A failure while writing the second file leaves the first target as it was, and no temporary."""
    import os

    from mechscope.errors import OutputError
    from mechscope.outputs import write_files

    (tmp_path / "a.json").write_text("old a")
    real_fdopen = os.fdopen
    calls = {"n": 0}

    def failing_fdopen(fd, mode):
        calls["n"] += 1
        if calls["n"] == 2:
            os.close(fd)
            raise OSError(28, "No space left on device", str(tmp_path / "b.html"))
        return real_fdopen(fd, mode)

    monkeypatch.setattr(os, "fdopen", failing_fdopen)
    with pytest.raises(OutputError, match="cannot write .*b.html: No space left on device"):
        write_files({tmp_path / "a.json": "new a", tmp_path / "b.html": "new b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert (tmp_path / "a.json").read_text() == "old a"
