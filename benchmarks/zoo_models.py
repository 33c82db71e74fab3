"""How costs grow with the zoo models' size, each measured in a fresh process (so peaks and load
times are not shared):

1. parameters and the float32 weights' size;
2. `load_model(alias)`: seconds (its cache check included) and the process's peak memory after it;
3. one forward: the four demo prompts, and 8 prompts of 128 tokens (best of `--repeats`);
4. attribution patching over every head (AtP, head_z) on 8 IOI prompts: one forward and backward
   of each run;
5. the process's peak memory at the end.

    .venv/bin/python benchmarks/zoo_models.py [--models smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b]

Models that are not fetched are fetched first (outside the timings).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from common import timed

MODELS = "smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b"


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def best(fn, repeats: int) -> float:
    return timed(fn, repeats)[1]


def measure(alias: str, repeats: int) -> dict:
    """One model, in this (fresh) process."""
    from mechscope import load_model
    from mechscope.cli import DEMO_PROMPTS
    from mechscope.patching import attribution_patch
    from mechscope.tasks import ContrastiveBatch, ioi

    start = time.perf_counter()
    model = load_model(alias)
    row = {"model": alias, "load_s": time.perf_counter() - start, "load_peak_gb": peak_gb()}
    row["params_m"] = sum(p.numel() for p in model.hf.parameters()) / 1e6
    row["weights_gb"] = sum(p.numel() * p.element_size() for p in model.hf.parameters()) / 1e9
    demo = model.to_tokens([p for p, _, _ in DEMO_PROMPTS])  # [4, ~15]
    long = torch.randint(100, 20000, (8, 128), generator=torch.Generator().manual_seed(0))  # [8, 128]
    with torch.no_grad():
        row["fwd_demo_ms"] = best(lambda: model(demo), repeats) * 1e3
        row["fwd_8x128_ms"] = best(lambda: model(long), repeats) * 1e3
    batch = ContrastiveBatch.from_records(model, ioi(8, seed=0, model=model))
    row["atp_heads_s"] = best(lambda: attribution_patch(model, batch, sites=["head_z"]), 1)
    row["peak_gb"] = peak_gb()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this model
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    from mechscope.models import zoo

    rows = []
    for alias in args.models.split(","):
        zoo.fetch(alias)
        done = subprocess.run([sys.executable, __file__, "--one", alias, "--repeats", str(args.repeats)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(f"{'model':<20} {'params':>8} {'weights':>8} {'load':>7} {'peak':>8} {'fwd 4 demo':>11} "
          f"{'fwd 8x128':>10} {'AtP heads':>10} {'peak':>8}  (x {first['model']}: params, fwd 8x128)")
    for r in rows:
        print(f"{r['model']:<20} {r['params_m']:>7.0f}M {r['weights_gb']:>6.2f}GB {r['load_s']:>6.2f}s "
              f"{r['load_peak_gb']:>6.2f}GB {r['fwd_demo_ms']:>9.0f}ms {r['fwd_8x128_ms']:>8.0f}ms "
              f"{r['atp_heads_s']:>9.2f}s {r['peak_gb']:>6.2f}GB  "
              f"(x{r['params_m'] / first['params_m']:.1f}, x{r['fwd_8x128_ms'] / first['fwd_8x128_ms']:.1f})")


if __name__ == "__main__":
    main()
