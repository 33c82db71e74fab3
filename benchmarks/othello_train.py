"""Othello-GPT training speed: milliseconds per step (forward, backward, clip, fused AdamW) of the
training loop in `mechscope.organisms.othello.train`, in float32, under bf16 autocast, and compiled
with torch.compile, on random games; with the arithmetic each step does, so the figure says how
close to the card's limit it runs.

    python benchmarks/othello_train.py --device cuda --d-model 160 --batch 1024 --json steps.json

1. Each variant builds the model afresh (same seed), runs `--warmup` steps (the compiled variant
   compiles in the first; that time is reported apart) and times `--steps` more between device
   synchronisations.
2. FLOPs per step: 6 x (matrix parameters) x tokens, plus the attention products (6 x 2 x T x d per
   token per layer, causal halves not counted as saved).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mechscope.organisms.othello import random_games
from mechscope.organisms.othello.train import _optimizer, _step_loss, _update, model_config


def run(args, precision: str, compile: bool) -> dict:
    from transformers import GPT2LMHeadModel

    config = model_config(args.size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(args.device).train()
    opt = _optimizer(model, 1e-3, 0.01, args.device)  # train()'s AdamW, as its defaults set it
    step_loss = _step_loss(model, args.device, precision, compile)
    data = torch.from_numpy(random_games(4 * args.batch, size=args.size, seed=1).tokens.astype(np.int64))
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def step():
        batch = data[rng.integers(0, len(data), args.batch)].to(args.device)  # [batch, moves]
        _update(model, opt, step_loss(batch))

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    ms = (time.perf_counter() - start) / args.steps * 1e3
    matrix = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "wte" not in n and "wpe" not in n)
    tokens = args.batch * data.shape[1]
    flops = 6 * tokens * (matrix + 2 * data.shape[1] * args.d_model * args.layers + args.d_model * config.vocab_size)
    return {"precision": precision, "compile": compile, "ms_per_step": ms, "warmup_s": warm,
            "games_per_s": args.batch / ms * 1e3, "tflops": flops / ms / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=6)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--variants", nargs="*", default=["fp32", "bf16", "bf16+compile"],
                   choices=["fp32", "bf16", "fp32+compile", "bf16+compile"])
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"Othello-GPT {args.size}x{args.size}, width {args.d_model}, {args.layers} layers, batch {args.batch}, {name}")
    rows = []
    for variant in args.variants:
        precision, _, compiled = variant.partition("+")
        rows.append(run(args, precision, bool(compiled)))
        r = rows[-1]
        print(f"{variant:>14}: {r['ms_per_step']:7.2f} ms/step  {r['games_per_s']:9,.0f} games/s  "
              f"{r['tflops']:6.2f} TFLOP/s  (first {args.warmup} steps {r['warmup_s']:.1f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, **vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
