"""examples/ run as a newcomer would run them (on the session's SmolLM2, with few prompts and three
patched layers), and what they find checked against the IOI study pinned in tests/real/data."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("no_grad")]
ROOT = Path(__file__).resolve().parents[2]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exploratory_analysis(smollm2, capsys):
    out = _example("exploratory_analysis").main(smollm2, n=4, layers=[20, 23, 24])
    printed = capsys.readouterr().out
    assert "logit difference" in printed and "mechscope ioi" in printed
    d = out["logit_diff"]
    # TransformerLens's cache methods and mechscope's functions: the same numbers, to float32
    # rounding of sums of about 60 terms of order 1.
    assert max(out["dla_agree"], out["head_dla_agree"], out["lens_agree"]) < 1e-4 * max(1.0, abs(d))
    assert out["dla_total"] == pytest.approx(d, rel=1e-4)  # SmolLM2's final norm has no bias
    assert out["lens_last"] == pytest.approx(d, rel=1e-4)
    # What it finds is the circuit of the pinned study (other prompts, seed 3, 32 of them): its first
    # name mover writes the answer most and matters most when patched, and its first S-inhibition
    # head acts most through the name movers' queries.
    pinned = json.loads((ROOT / "tests/real/data/ioi_smollm2_seed3.json").read_text())["circuit"]
    mover = "L{}H{}".format(*pinned["name_mover"][0].split("."))
    assert out["top_dla_heads"][0] == mover
    assert "L{layer}H{head}".format(**out["head_top"][0][0]) == mover
    assert "{layer}.{head}".format(**out["path_top"][0][0]) == pinned["s_inhibition"][0]
    assert out["atp_correlation"] > 0.9
