"""Beyond one process, measured in one run:

1. attribution patching (AtP, head_z) and exact patching (resid_pre, every layer) over an IOI set,
   in one process and on N Ray workers that each load the model (mechscope.distributed): wall time
   of each, the speed-up, and the largest difference between their values;
2. the peak memory of a process that loads the model and runs one forward, plain and with a device
   map that offloads half its layers to disk (accelerate), and the largest logit difference.

    .venv/bin/python benchmarks/scale.py [--model smollm2-135m] [--n 64] [--workers 2]

The worker rows include starting Ray and loading the model in every worker (a Cluster that is kept
pays that once). On a machine of C cores, one process uses C threads and each of N workers C / N:
the speed-up measures how well the work splits; on more cores or GPUs (gpus_per_worker=1) it grows
with N.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch

from mechscope import load_model
from mechscope.distributed import Cluster
from mechscope.patching import activation_patch, attribution_patch
from mechscope.tasks import ContrastiveBatch, ioi


def technique_rows(args) -> list[tuple]:
    model = load_model(args.model)
    batch = ContrastiveBatch.from_records(model, ioi(args.n, seed=0, model=model))
    work = {
        "AtP, head_z": lambda run: run(attribution_patch, batch, sites=["head_z"])["head_z"],
        "exact patching, resid_pre": lambda run: run(activation_patch, batch, site="resid_pre"),
    }
    here = {}
    for name, fn in work.items():
        start = time.perf_counter()
        here[name] = (fn(lambda t, b, **kw: t(model, b, **kw)), time.perf_counter() - start)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    rows = []
    start = time.perf_counter()
    with Cluster(args.model, workers=args.workers, cpus_per_worker=threads) as cluster:
        started = time.perf_counter() - start
        for i, (name, fn) in enumerate(work.items()):
            t = time.perf_counter()
            result = fn(cluster.run)
            seconds = time.perf_counter() - t + (started if i == 0 else 0.0)  # the first row pays the start
            one, one_seconds = here[name]
            diff = (result.values - one.values).abs().max().item()
            rows.append((name, one_seconds, seconds, one_seconds / seconds, diff))
    print(f"Ray start and {args.workers} model loads: {started:.1f} s (in the first row)")
    return rows


def memory_probe(model_spec: str, offload: bool) -> dict:
    """In a fresh process: load (plain, or the second half of the layers on disk), one forward;
    the peak RSS."""
    kwargs = {}
    if offload:
        kwargs = dict(device="auto", max_memory={"cpu": _first_half_bytes(model_spec)},
                      offload_folder=tempfile.mkdtemp(prefix="mechscope-offload-"))
    model = load_model(model_spec, **kwargs)
    tokens = model.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    on_disk = sum(1 for v in getattr(model.hf, "hf_device_map", {}).values() if v == "disk")
    return {"peak_gb": _peak_rss_gb(), "on_disk": on_disk, "logits": logits.tolist()}


def _peak_rss_gb() -> float:
    """This process's peak RSS (VmHWM): ru_maxrss would carry the parent's peak over fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # not Linux


def _first_half_bytes(model_spec: str) -> int:
    """Bytes (float32) of every weight but those of the second half of the layers, read from the
    safetensors headers (no weight is loaded)."""
    from safetensors import safe_open

    from mechscope.models import zoo

    sizes = {}
    for file in zoo.fetch(model_spec, verify="stamp").glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                sizes[key] = 4 * int(torch.tensor(f.get_slice(key).get_shape()).prod())
    layer_of = {k: int(m.group(1)) for k in sizes if (m := re.search(r"layers\.(\d+)\.", k))}
    half = (max(layer_of.values()) + 1) // 2
    return sum(v for k, v in sizes.items() if layer_of.get(k, -1) < half)


def memory_rows(args) -> list[tuple]:
    out = {}
    for kind in ("plain", "offload"):
        done = subprocess.run([sys.executable, __file__, "--model", args.model, "--probe", kind],
                              capture_output=True, text=True, check=True)
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    diff = (torch.tensor(out["plain"]["logits"]) - torch.tensor(out["offload"]["logits"])).abs().max().item()
    return [(kind, out[kind]["peak_gb"], out[kind]["on_disk"], diff) for kind in out]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=64, help="IOI prompts")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--probe", choices=["plain", "offload"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(args.model, args.probe == "offload")))
        return
    print(f"{args.model}, {args.n} IOI prompts, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"\n{'technique':<24} {'1 process s':>12} {f'{args.workers} workers s':>12} {'speed-up':>9} {'max |diff|':>11}")
    for name, one, many, speedup, diff in technique_rows(args):
        print(f"{name:<24} {one:>12.1f} {many:>12.1f} {speedup:>8.2f}x {diff:>11.1e}")
    print(f"\n{'load and one forward':<24} {'peak RSS GB':>12} {'modules on disk':>16} {'max |logit diff|':>17}")
    for kind, peak, on_disk, diff in memory_rows(args):
        print(f"{kind:<24} {peak:>12.2f} {on_disk:>16} {diff:>17.1e}")


if __name__ == "__main__":
    main()
