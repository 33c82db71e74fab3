"""The benchmark scripts run (a tiny configuration of each that needs no zoo model): a benchmark
that rots silently leaves the README's figures without a command that gives them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_othello_training_benchmark_times_each_variant(tmp_path):
    out = tmp_path / "steps.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "othello_train.py"), "--device", "cpu", "--d-model",
                           "16", "--layers", "1", "--heads", "2", "--batch", "8", "--steps", "2", "--warmup", "1",
                           "--variants", "fp32", "bf16", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["compile"]) for r in rows] == [("fp32", False), ("bf16", False)]
    assert all(r["ms_per_step"] > 0 and r["tflops"] > 0 for r in rows)
    assert "ms/step" in done.stdout
