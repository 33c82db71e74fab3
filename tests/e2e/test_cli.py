"""The command line, end to end, on a tiny local model."""

import json

import pytest
from typer.testing import CliRunner

from conftest import byte_tokenizer, tiny_hf
from mechscope.cli import app

runner = CliRunner()


@pytest.fixture
def model_dir(tmp_path):
    tiny_hf("llama-gqa").save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_patch_writes_the_result_json(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"clean": "the cat sat", "corrupt": "the rat sat", "answer": "a", "wrong": "b"},
        {"clean": "a dog ran far", "corrupt": "a fox ran off", "answer": "c", "wrong": "d"},
    ]))
    out = tmp_path / "r.json"
    done = runner.invoke(app, ["patch", "--model", str(model_dir), "--prompts", str(prompts),
                               "--site", "head_z", "--per-position", "--out", str(out)])
    assert done.exit_code == 0, done.output
    result = json.loads(out.read_text())
    for key in ("technique", "site", "axes", "labels", "values", "metric", "clean_metric", "corrupt_metric",
                "model", "n_prompts", "seconds"):
        assert key in result, key
    assert result["technique"] == "exact" and result["axes"] == ["layer", "head", "pos"] and result["n_prompts"] == 2
    assert "effect" in done.output  # the top components were printed


def test_patch_errors_are_clear_and_write_nothing(model_dir, tmp_path):
    out = tmp_path / "r.json"
    done = runner.invoke(app, ["patch", "--model", str(model_dir), "--site", "head_z", "--out", str(out)])
    assert done.exit_code == 1 and "give either --prompts FILE.jsonl or --task ioi" in done.output
    done = runner.invoke(app, ["patch", "--model", "never-loaded", "--task", "ioi", "--site", "nope", "--out", str(out)])
    assert done.exit_code == 1 and "unknown patching site 'nope'" in done.output
    assert not out.exists()


def test_models_list():
    done = runner.invoke(app, ["models", "list"])
    assert done.exit_code == 0 and "smollm2-135m" in done.output and "gemma3-270m" in done.output


def test_demo_with_an_unreachable_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    done = runner.invoke(app, ["demo", "--model", "mechscope-tests/none"])
    assert done.exit_code == 1 and "smollm2-135m" in done.output


def test_attribute_writes_json_and_verifies(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"clean": "the cat sat", "corrupt": "the rat sat", "answer": "a", "wrong": "b"}))
    out = tmp_path / "a.json"
    done = runner.invoke(app, ["attribute", "--model", str(model_dir), "--prompts", str(prompts), "--site", "head_k",
                               "--method", "atp*", "--verify", "2", "--out", str(out)])
    assert done.exit_code == 0, done.output
    result = json.loads(out.read_text())
    assert result["technique"] == "atp*" and result["site"] == "head_k" and result["axes"] == ["layer", "head"]
    assert len(result["extra"]["verify"]["top"]) == 2 and "graddrop" in result["extra"]
    for key in ("values", "metric", "clean_metric", "corrupt_metric", "model", "n_prompts", "seconds", "labels"):
        assert key in result
