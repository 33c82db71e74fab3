"""The command line never loses data: each output path is checked before any model loads, nothing is
written over an input, a non-regular file or another output, and a failed run leaves no file behind.
Every bad input is one `error:` line naming what was wrong and what would work, with exit code 1.

`--model never-loaded` (no such model) proves a check came before the load: a load would fail with
another message."""

import json
import os
import stat

import pytest
import torch
from typer.testing import CliRunner

from conftest import byte_tokenizer, snapshot, tiny_hf
from mechscope.cli import app

runner = CliRunner()
RECORDS = [{"clean": "the cat sat", "corrupt": "the rat sat", "answer": "a", "wrong": "b"},
           {"clean": "a dog ran far", "corrupt": "a fox ran off", "answer": "c", "wrong": "d"}]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder holding a tiny model (m/) and a prompts file (p.jsonl), as the current directory."""
    tiny_hf("llama-gqa", dtype=torch.float32).save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args):
    done = runner.invoke(app, [str(a) for a in args])
    return done.exit_code, " ".join(done.output.split())


def refused(work, args, message):
    """The command exits 1 with one error line containing `message`, and changes no file."""
    before = snapshot(work)
    code, out = run(*args)
    assert code == 1, out
    assert out.startswith("error:") or "error:" in out, out
    assert message in out, out
    assert snapshot(work) == before
    return out


def patch_args(out, model="m", **options):
    args = ["patch", "--model", model, "--site", "resid_pre", "--out", out]
    args += [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", v)]
    return args + ([] if "task" in options or "prompts" in options else ["--prompts", "p.jsonl"])


# ---- outputs -------------------------------------------------------------------------------------
def test_a_fifo_as_out_stays_a_fifo(work):
    fifo = work / "pipe"
    os.mkfifo(fifo)
    refused(work, patch_args(fifo, model="never-loaded"), "is not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a device node")
def test_a_device_node_as_out_stays_a_device(work):
    node = work / "null"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    refused(work, patch_args(node, model="never-loaded"), "is not a regular file")
    refused(work, ["report", "p.jsonl", "-o", node], "is not a regular file")
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_a_link_a_directory_or_dot_as_out(work):
    (work / "target.json").write_text("mine")
    (work / "link.json").symlink_to(work / "target.json")
    refused(work, patch_args("link.json", model="never-loaded"), "is a symbolic link")
    (work / "adir").mkdir()
    refused(work, patch_args("adir", model="never-loaded"), "is a directory")
    refused(work, patch_args(".", model="never-loaded"), "is a directory")


def test_html_out_is_refused_because_the_report_would_overwrite_the_json(work):
    refused(work, patch_args("mine.html", model="never-loaded"), "give --out mine.json")


def test_out_equal_to_the_prompts_is_refused(work):
    refused(work, patch_args("p.jsonl", model="never-loaded"), "is also an input")
    (work / "sub").mkdir()
    refused(work, patch_args("sub/../p.jsonl", model="never-loaded"), "is also an input")


def test_report_onto_its_own_source_is_refused(work):
    (work / "same.json").write_text(json.dumps({"values": [1.0], "axes": ["layer"], "labels": {"layer": ["0"]},
                                                "technique": "exact", "model": "m", "n_prompts": 1, "seconds": 0}))
    refused(work, ["report", "same.json", "-o", "same.json"], "is also an input")
    refused(work, ["report", "same.json", "-o", "./same.json", "--overwrite"], "is also an input")


def test_existing_outputs_are_kept_unless_overwrite(work):
    (work / "r.html").write_text("an earlier report")
    refused(work, patch_args("r.json", model="never-loaded"), "r.html already exists; pass --overwrite")
    code, out = run(*patch_args("r.json"), "--overwrite")
    assert code == 0, out
    assert "will write r.json and r.html" in out
    assert json.loads((work / "r.json").read_text())["site"] == "resid_pre"
    assert (work / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert oct((work / "r.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def test_missing_parent_or_read_only_folder_is_refused_before_the_load(work, make_read_only):
    refused(work, patch_args("nowhere/r.json", model="never-loaded"), "the folder nowhere does not exist")
    locked = work / "locked"
    locked.mkdir()
    make_read_only(locked)
    refused(work, patch_args(locked / "r.json", model="never-loaded"), "is not writable")
    refused(work, ["ioi", "--model", "never-loaded", "--out", locked / "study"], "is not writable")


def test_a_failed_run_leaves_nothing_behind(work):
    (work / "bad.jsonl").write_text(json.dumps({**RECORDS[0], "corrupt": "the rats sat"}))  # lengths differ
    refused(work, patch_args("r.json", prompts="bad.jsonl"), "patching needs equal lengths")


def test_ioi_out_checks(work):
    (work / "afile").write_text("x")
    refused(work, ["ioi", "--model", "never-loaded", "--out", "afile"], "exists and is not a folder")
    (work / "old").mkdir()
    (work / "old" / "ioi.json").write_text("{}")
    refused(work, ["ioi", "--model", "never-loaded", "--out", "old"], "ioi.json already exists; pass --overwrite")


# ---- bad values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--metric", "bogus"], "unknown metric 'bogus'; use one of logit_diff, answer_prob, kl_div"),
    (["--direction", "sideways"], "direction must be 'denoise'"),
    (["--task", "ioi", "--n", "1000000000"], "--n must be between 1 and 5000 prompts, not 1000000000"),
    (["--task", "ioi", "--n", "0"], "--n must be between 1 and 5000"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["--top", "-1"], "--top must be 0 or more"),
])
def test_bad_patch_options_fail_before_the_load(work, args, message):
    options = dict(zip(args[::2], args[1::2]))
    refused(work, patch_args("r.json", model="never-loaded", **{k[2:].replace("-", "_"): v for k, v in options.items()}),
            message)


def test_bad_attribute_options(work):
    base = ["attribute", "--model", "never-loaded", "--site", "head_z", "--prompts", "p.jsonl", "--out", "a.json"]
    refused(work, base + ["--verify", "-5"], "--verify must be 0 (no check) or a number of components")
    refused(work, base + ["--method", "exact"], "--method must be atp or atp*")


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be between 1 and 5000 prompts, not 0"),
    (["--n", "1000000000"], "--n must be between 1 and 5000"),
    (["--n-path", "0"], "n_path must be between 1 and n (40); got 0"),
    (["--threshold", "nan"], "threshold is a fraction of F(M) between 0 and 1, e.g. 0.01; got nan"),
    (["--threshold", "-1"], "got -1.0"),
])
def test_bad_ioi_options_fail_before_the_load(work, args, message):
    refused(work, ["ioi", "--model", "never-loaded", "--out", "study", *args], message)


@pytest.mark.parametrize("line, message", [
    ("123", "p2.jsonl:1: expected an object"),
    ("null", "p2.jsonl:1: expected an object"),
    ('{"clean": 5, "corrupt": "x", "answer": "a", "wrong": "b"}', '"clean" must be a non-empty string, not int 5'),
    ('{"clean": "", "corrupt": "", "answer": "a", "wrong": "b"}', '"clean" must be a non-empty string, not an empty'),
    ('{"clean": "the cat", "corrupt": "the rat", "answer": "a", "wrong": "a"}', "are the same token"),
    ('{"clean": "the cat", "corrupt": "the rat"', "p2.jsonl:1: not valid JSON"),
])
def test_bad_prompt_lines(work, line, message):
    (work / "p2.jsonl").write_text(line + "\n")
    refused(work, patch_args("r.json", prompts="p2.jsonl"), message)


def test_prompts_are_utf8_with_or_without_a_byte_order_mark(work):
    text = "\n".join(json.dumps({"clean": "café ok", "corrupt": "cafè ok", "answer": "a", "wrong": "b"},
                                ensure_ascii=False) for _ in range(2))
    (work / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    code, out = run(*patch_args("r.json", prompts="bom.jsonl"))
    assert code == 0, out
    (work / "latin1.jsonl").write_bytes(text.encode("latin-1"))
    refused(work, patch_args("r2.json", prompts="latin1.jsonl"), "is not UTF-8 text")


def test_a_prompt_longer_than_the_context(work):
    long = " ".join(["cat"] * 40)  # 159 bytes; the tiny model has 64 positions
    (work / "long.jsonl").write_text(json.dumps({"clean": long, "corrupt": long, "answer": "a", "wrong": "b"}))
    refused(work, patch_args("r.json", prompts="long.jsonl"), "159 tokens are more than")


# ---- report ----------------------------------------------------------------------------------------
def test_report_on_bad_sources(work, make_read_only):
    (work / "partial.json").write_text(json.dumps({"values": [1.0], "axes": ["layer"]}))
    refused(work, ["report", "partial.json"], "lacks the field 'technique'")
    (work / "binary.json").write_bytes(bytes(range(256)))
    refused(work, ["report", "binary.json"], "is not text (it is not UTF-8)")
    (work / "list.json").write_text("[1, 2]")
    refused(work, ["report", "list.json"], "a report needs a JSON object, not list")
    good = {"values": [1.0], "axes": ["layer"], "labels": {"layer": ["0"]}, "technique": "exact", "model": "m",
            "n_prompts": 1, "seconds": 0}
    (work / "good.json").write_text(json.dumps(good))
    locked = work / "locked"
    locked.mkdir()
    make_read_only(locked)
    refused(work, ["report", "good.json", "-o", locked / "r.html"], "is not writable")
    code, out = run("report", "good.json")
    assert code == 0 and (work / "good.html").is_file(), out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
