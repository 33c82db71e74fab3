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


def test_models_families_lists_every_adapter_and_the_refused():
    from mechscope.models.adapters import ADAPTERS, NOT_YET

    done = runner.invoke(app, ["models", "families"], terminal_width=200)
    assert done.exit_code == 0
    for name in [a.family for a in ADAPTERS] + list(NOT_YET):
        assert f"│ {name} " in done.output, name


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


@pytest.fixture
def ioi_model_dir(tmp_path):
    from conftest import ioi_model

    model = ioi_model("llama-gqa", layers=4)
    model.hf.save_pretrained(tmp_path / "ioi-m")
    model.tokenizer.save_pretrained(tmp_path / "ioi-m")
    return tmp_path / "ioi-m"


def test_ioi_writes_json_and_report(ioi_model_dir, tmp_path):
    out = tmp_path / "study"
    done = runner.invoke(app, ["ioi", "--model", str(ioi_model_dir), "--n", "6", "--n-path", "3", "--seed", "2",
                               "--out", str(out)])
    assert done.exit_code == 0, done.output
    data = json.loads((out / "ioi.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in ioi.json"))
    assert data["n_prompts"] == 6 and data["n_path_prompts"] == 3 and data["seed"] == 2
    assert set(data["circuit"]) == {"name_mover", "negative_name_mover", "backup_name_mover", "s_inhibition",
                                    "induction", "duplicate_token", "previous_token"}
    assert "F(M)" in done.output and "name_mover" in done.output
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and not any(x in page for x in ("<script src", "<link", "url(", "@import"))

    again = tmp_path / "again.html"
    done = runner.invoke(app, ["report", str(out), "-o", str(again)])
    assert done.exit_code == 0, done.output
    assert again.read_text() == page

    # a second run into the same folder replaces both files, and only when asked
    rerun = ["ioi", "--model", str(ioi_model_dir), "--n", "6", "--n-path", "3", "--seed", "3", "--out", str(out)]
    done = runner.invoke(app, rerun)
    assert done.exit_code == 1 and "ioi.json already exists; pass --overwrite" in " ".join(done.output.split())
    assert (out / "report.html").read_text() == page
    done = runner.invoke(app, rerun + ["--overwrite"])
    assert done.exit_code == 0, done.output
    assert json.loads((out / "ioi.json").read_text())["seed"] == 3 and (out / "report.html").read_text() != page
    assert sorted(p.name for p in out.iterdir()) == ["ioi.json", "report.html"]  # no temporaries


def test_report_errors(tmp_path):
    done = runner.invoke(app, ["report", str(tmp_path / "missing.json")])
    assert done.exit_code == 1 and "does not exist" in " ".join(done.output.split())
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    done = runner.invoke(app, ["report", str(bad)])
    assert done.exit_code == 1 and "neither a study" in " ".join(done.output.split())
    assert not bad.with_suffix(".html").exists()


def test_the_paper_heads_are_printed_beside_the_found_ones_for_gpt2(capsys):
    from mechscope import cli
    from mechscope.studies import PAPER_GPT2

    found = {cls: [] for cls in PAPER_GPT2} | {"name_mover": ["9.9", "9.6"]}
    cli._print_circuit({"circuit": found, "paper_circuit": PAPER_GPT2, "completeness": None, "logit_diff": 3.5,
                        "circuit_logit_diff": 3.0, "faithfulness": 3.0 / 3.5, "n_circuit_heads": 2, "n_model_heads": 144})
    out = " ".join(capsys.readouterr().out.split())
    assert "Wang et al. 2022" in out and "9.9 9.6 10.0" in out and "10.7 11.10" in out and "faithfulness 0.857" in out


def test_positions_writes_its_json_and_report(tmp_path):
    from conftest import bpe_word_model

    model = bpe_word_model()
    model.hf.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    args = ["positions", "--model", str(tmp_path / "m"), "--n", "16", "--n-ioi", "4", "--heads", "2.1,1.3",
            "--out", str(out)]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    result = json.loads((out / "positions.json").read_text())
    for key in ("model", "best_layer", "accuracy", "position_baseline", "random_init_control", "shuffled_labels",
                "per_index_f1", "confusion", "cross_template_ratio", "seconds"):
        assert key in result, key
    assert result["causal"]["heads"] == ["1.3", "2.1"] and (out / "report.html").stat().st_size > 1000
    assert "best layer" in done.output and "cross-template" in done.output
    again = runner.invoke(app, args)  # an earlier run is never replaced silently
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_positions_refuses_bad_heads_before_loading(tmp_path):
    out = tmp_path / "out"
    done = runner.invoke(app, ["positions", "--model", "never-loaded", "--heads", "seven", "--out", str(out)])
    assert done.exit_code == 1 and "neither heads like '7.3,8.6'" in done.output and not out.exists()
    (tmp_path / "ioi.json").write_text('{"circuit": {}}')
    done = runner.invoke(app, ["positions", "--model", "never-loaded", "--heads", str(tmp_path / "ioi.json"),
                               "--out", str(out)])
    assert done.exit_code == 1 and "no circuit.s_inhibition" in done.output


def test_othello_commands_write_their_json(tmp_path):
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel

    from mechscope.organisms.othello.train import model_config

    done = runner.invoke(app, ["othello", "games", "--n", "50", "--seed", "3", "--out", str(tmp_path / "g")])
    assert done.exit_code == 0, done.output
    tokens = np.load(tmp_path / "g" / "games.npy")
    assert tokens.shape == (50, 32) and json.loads((tmp_path / "g" / "games.json").read_text())["seed"] == 3
    done = runner.invoke(app, ["othello", "evaluate", "--n", "40", "--out", str(tmp_path / "e")])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "e" / "evaluate.json").read_text())["top1_legal"] > 0.95  # the shipped model
    torch.manual_seed(0)
    GPT2LMHeadModel(model_config(6, d_model=32, n_layers=2, n_heads=4)).save_pretrained(tmp_path / "tiny")
    done = runner.invoke(app, ["othello", "intervene", "--model", str(tmp_path / "tiny"), "--n", "40", "--cases", "5",
                               "--out", str(tmp_path / "p")])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "p" / "probe.json").read_text())["layers"] == ["embed", "0", "1"]
    assert json.loads((tmp_path / "p" / "intervene.json").read_text())["n_cases"] == 5
    report = (tmp_path / "p" / "report.html").read_text()
    assert "A held-out game, move by move" in report and "Interventions, before and after" in report
    again = runner.invoke(app, ["othello", "games", "--n", "50", "--out", str(tmp_path / "g")])
    assert again.exit_code == 1 and "--overwrite" in again.output
    bad = runner.invoke(app, ["othello", "train", "--games", str(tmp_path / "g" / "games.json"), "--out", str(tmp_path / "t")])
    assert bad.exit_code == 1 and "does not hold 6x6 games" in " ".join(bad.output.split())
    bad = runner.invoke(app, ["othello", "train", "--games", str(tmp_path / "g" / "games.npy"), "--precision", "fp16",
                              "--out", str(tmp_path / "t")])
    assert bad.exit_code == 1 and "--precision fp16 is not one of fp32, bf16" in " ".join(bad.output.split())
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("args, message", [
    (["othello", "games", "--n", "0"], "--n must be between 1"), (["othello", "games", "--size", "7"], "--size is 6 or 8"),
    (["othello", "evaluate", "--n", "0"], "--n must be between 1"), (["othello", "probe", "--n", "1"], "at least 2 games"),
    (["othello", "evaluate", "--size", "8"], "no Othello-GPT ships for a 8x8 board"),
    (["othello", "probe", "--model", "."], "is not a trained model's folder"),
    (["othello", "evaluate", "--device", "cuda:99"], "device 'cuda:99'"),
    (["othello", "intervene", "--device", "nonsense"], "is not a device")])
def test_othello_refuses_bad_requests_before_work(tmp_path, args, message):
    done = runner.invoke(app, args + ["--out", str(tmp_path / "o")])
    assert done.exit_code == 1 and message in " ".join(done.output.split()) and not (tmp_path / "o").exists()


def test_discover_writes_json_scores_and_report(ioi_model_dir, tmp_path):
    out = tmp_path / "disc"
    args = ["discover", "--model", str(ioi_model_dir), "--task", "ioi", "--n", "6", "--method", "eap-ig",
            "--steps", "2", "--out", str(out)]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    data = json.loads((out / "discover.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in discover.json"))
    for key in ("model", "method", "n_prompts", "n_nodes", "n_edges_total", "circuit", "faithfulness",
                "faithfulness_eval", "curve", "forward_equivalents", "seconds"):
        assert key in data, key
    assert data["method"] == "eap-ig" and data["steps"] == 2 and data["n_prompts"] == 6 and data["n_eval_prompts"] == 6
    assert data["faithfulness"] >= 0.8 and "smallest" in data["chosen"]
    assert all("->" in e for e in data["circuit"]) and len(data["circuit"]) == data["n_circuit_edges"]
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["values"]) == data["n_edges_total"] == len(scores["labels"]["edge"])
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    done = runner.invoke(app, args)  # never over an earlier run unless asked
    assert done.exit_code == 1 and "already exists" in done.output
    assert data["selection"] == "signed"  # --select auto: signed for EAP-IG
    done = runner.invoke(app, args[:-2] + ["--edges", "5", "--select", "abs", "--out", str(tmp_path / "five")])
    assert done.exit_code == 0, done.output
    five = json.loads((tmp_path / "five" / "discover.json").read_text())
    assert five["n_circuit_edges"] <= 5 and five["selection"] == "abs"
    by_size = sorted(scores["labels"]["edge"], key=lambda e: -abs(scores["values"][scores["labels"]["edge"].index(e)]))
    assert set(five["circuit"]) <= set(by_size[:5])
    done = runner.invoke(app, args[:-2] + ["--edges", "5", "--out", str(tmp_path / "signed")])
    assert done.exit_code == 0, done.output
    signed = json.loads((tmp_path / "signed" / "discover.json").read_text())
    ranked = sorted(scores["labels"]["edge"], key=lambda e: scores["values"][scores["labels"]["edge"].index(e)])
    assert signed["selection"] == "signed" and set(signed["circuit"]) <= set(ranked[:5])  # the most negative effects
    done = runner.invoke(app, args[:-2] + ["--method", "eap", "--edges", "5", "--out", str(tmp_path / "eap")])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "eap" / "discover.json").read_text())["selection"] == "abs"  # auto: |score| for EAP


def test_discover_never_writes_over_its_prompts(ioi_model_dir, tmp_path):
    out = tmp_path / "disc"
    out.mkdir()
    prompts = out / "discover.json"  # prompts kept, by accident, under the name of an output
    prompts.write_text(json.dumps({"clean": "a", "corrupt": "b", "answer": " c", "wrong": " d"}) + "\n")
    before = prompts.read_bytes()
    done = runner.invoke(app, ["discover", "--model", str(ioi_model_dir), "--prompts", str(prompts), "--out", str(out),
                               "--overwrite"])
    assert done.exit_code == 1 and "would destroy the input" in " ".join(done.output.split())
    assert prompts.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["discover.json"]


@pytest.mark.parametrize("extra,message", [
    (["--method", "acdc"], "needs --threshold"), (["--method", "magic"], "--method must be one of"),
    (["--ablation", "noise"], "unknown ablation"), (["--steps", "0"], "--steps must be"),
    (["--edges", "0"], "--edges must be"), (["--n", "0"], "--n must be"), (["--select", "max"], "--select must be auto, abs or signed"),
])
def test_discover_refuses_bad_options_before_loading(tmp_path, extra, message):
    done = runner.invoke(app, ["discover", "--model", "never-loaded", "--task", "ioi", "--out", str(tmp_path / "o"), *extra])
    assert done.exit_code == 1 and message in " ".join(done.output.split()), done.output
    assert not (tmp_path / "o").exists()


def test_device_and_dtype_options(model_dir, tmp_path):
    """Every command that loads a model takes --device and --dtype; a bad one is a clear error before
    any weight is read, and nothing is written."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"clean": "the cat sat", "corrupt": "the rat sat", "answer": "a", "wrong": "b"}))
    out = tmp_path / "r.json"
    base = ["patch", "--model", str(model_dir), "--prompts", str(prompts), "--site", "resid_pre", "--out", str(out)]
    done = runner.invoke(app, base + ["--dtype", "int8"])
    assert done.exit_code == 1 and "dtype 'int8' is not one of float32, float16, bfloat16, float64" in done.output
    done = runner.invoke(app, base + ["--device", "cuda:7"])
    assert done.exit_code == 1 and ("lacks" in done.output or "cuda:7" in done.output), done.output
    assert not out.exists()
    done = runner.invoke(app, base + ["--dtype", "bfloat16", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert json.loads(out.read_text())["n_prompts"] == 1
    for command in ("attribute", "ioi", "discover", "positions", "demo"):
        assert "--device" in runner.invoke(app, [command, "--help"], terminal_width=200).output, command


def test_workers_write_the_numbers_of_one_process(model_dir, tmp_path):
    """patch --workers 2: a local Ray cluster, each worker loading the model; the JSON has the same
    numbers as one process (float64: exact patching agrees to rounding)."""
    pytest.importorskip("ray")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"clean": "the cat sat", "corrupt": "the rat sat", "answer": "a", "wrong": "b"},
        {"clean": "a dog ran far", "corrupt": "a fox ran off", "answer": "c", "wrong": "d"},
        {"clean": "my fox hid", "corrupt": "my cat hid", "answer": "e", "wrong": "f"},
    ]))
    base = ["patch", "--model", str(model_dir), "--prompts", str(prompts), "--site", "head_z", "--dtype", "float64"]
    results = []
    for name, extra in (("one", []), ("many", ["--workers", "2"])):
        done = runner.invoke(app, base + ["--out", str(tmp_path / f"{name}.json")] + extra)
        assert done.exit_code == 0, done.output
        results.append(json.loads((tmp_path / f"{name}.json").read_text()))
    one, many = results
    assert many["extra"]["workers"] == 2 and many["n_prompts"] == one["n_prompts"] == 3
    assert many["labels"] == one["labels"] and many["dtype"] == one["dtype"] == "float64"
    assert max(abs(a - b) for x, y in zip(one["values"], many["values"]) for a, b in zip(x, y)) < 1e-12


def test_worker_options_are_checked_before_any_model_loads(tmp_path):
    out = tmp_path / "r.json"
    base = ["--model", "never-loaded", "--task", "ioi"]
    done = runner.invoke(app, ["patch", *base, "--site", "head_z", "--out", str(out), "--ray-address", "auto"])
    assert done.exit_code == 1 and "--ray-address needs --workers N" in done.output
    done = runner.invoke(app, ["patch", *base, "--site", "head_z", "--out", str(out), "--workers", "-1"])
    assert done.exit_code == 1 and "--workers must be 0" in done.output
    done = runner.invoke(app, ["discover", *base, "--out", str(tmp_path / "d"), "--method", "acdc",
                               "--threshold", "0.1", "--workers", "2"])
    assert done.exit_code == 1 and "ACDC cannot be split over workers" in done.output
    done = runner.invoke(app, ["ioi", "--model", "never-loaded", "--out", str(tmp_path / "i"), "--screen", "atp",
                               "--workers", "2"])
    assert done.exit_code == 1 and "--screen runs in one process" in done.output
    done = runner.invoke(app, ["ioi", "--model", "never-loaded", "--out", str(tmp_path / "i"), "--screen", "top"])
    assert done.exit_code == 1 and "screen is None" in done.output
    assert not out.exists() and not (tmp_path / "d").exists() and not (tmp_path / "i").exists()
