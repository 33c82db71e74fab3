"""Overhead of a HookedModel forward against the plain Hugging Face model, in one run.

    .venv/bin/python benchmarks/hook_overhead.py [--model smollm2-135m] [--batch 8] [--repeats 30]

Modes: plain `transformers` forward; HookedModel with no hooks; run_with_cache of one site; of every
site (patterns included, so eager attention). Timings interleave the modes round by round, so that
drift of the machine hits all alike, and report the median. Peak memory is each mode's peak
resident set (CPU) or peak allocated memory (GPU), measured in a fresh process per mode.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from mechscope import load_model
from mechscope.cli import DEMO_PROMPTS

MODES = ("plain", "hooked", "one_site", "all_sites")


def make_runner(model, tokens, mode: str):
    mid = f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    return {
        "plain": lambda: model.hf(input_ids=tokens).logits,
        "hooked": lambda: model(tokens),
        "one_site": lambda: model.run_with_cache(tokens, names_filter=[mid]),
        "all_sites": lambda: model.run_with_cache(tokens),
    }[mode]


def setup(args):
    model = load_model(args.model, device=args.device)
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)][0] for i in range(args.batch)]
    return model, model.to_tokens(prompts)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_of(args, mode: str) -> float:
    """Run one mode in a fresh process; return its peak memory in MiB."""
    cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
           "--device", args.device, "--memory-of", mode]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory-of", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model, tokens = setup(args)

    if args.memory_of:  # child process: one mode, report its peak
        run = make_runner(model, tokens, args.memory_of)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            run()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            run()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"peak_mib": peak}))
        return

    runners = {mode: make_runner(model, tokens, mode) for mode in MODES}
    for run in runners.values():  # warm up
        run()
    times = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, run in runners.items():
            sync(args.device)
            start = time.perf_counter()
            run()
            sync(args.device)
            times[mode].append(time.perf_counter() - start)
    print(f"{model}\nbatch {tuple(tokens.shape)} on {args.device}, median of {args.repeats} interleaved runs\n")
    base = statistics.median(times["plain"])
    print(f"{'mode':<10} {'median ms':>10} {'overhead':>9} {'peak MiB':>9}")
    for mode in MODES:
        t = statistics.median(times[mode])
        print(f"{mode:<10} {t * 1e3:>10.1f} {100 * (t / base - 1):>8.1f}% {peak_memory_of(args, mode):>9.0f}")


if __name__ == "__main__":
    main()
