"""Training Othello-GPT: a plain Hugging Face causal LM, from scratch, on random legal games.

1. The model: a GPT-2 config (vocabulary = the squares plus padding, context = the longest game),
   so every mechscope technique works on it and plain `transformers` loads it.
2. The task: next-move prediction. Position t sees moves 0..t and is trained on move t+1; padding
   is never a target.
3. The loop: AdamW, linear warm-up then cosine decay, seeded batches drawn from the games; a
   checkpoint (weights, optimizer, step, random state) every `save_every` steps into `out`, and
   `train(..., resume=True)` continues from the last one; the loss curve goes to `curve.json`.
   On a GPU, `precision="bf16"` runs the forward and backward under bf16 autocast (the weights and
   AdamW's state stay float32) and `compile=True` compiles the model with torch.compile: a model
   this small is bound by its many small kernels, which compiling fuses (`benchmarks/othello_train.py`).
4. Evaluation (`evaluate`): on held-out games, the share of positions whose top-1 prediction is a
   legal move, and the legal-set error (of the model's top-k moves, k = the number of legal moves,
   the share that are not legal), as Li et al. report them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from mechscope.organisms.othello.engine import Games, replay, squares


def model_config(size: int = 6, *, d_model: int = 128, n_layers: int = 8, n_heads: int = 8):
    """The GPT-2 config of an Othello-GPT for a size x size board."""
    from transformers import GPT2Config

    n_tokens = size * size - 4 + 1  # the squares, and 0 for padding
    return GPT2Config(vocab_size=n_tokens, n_positions=size * size - 4, n_embd=d_model, n_layer=n_layers,
                      n_head=n_heads, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def loss_on(model, tokens: Tensor) -> Tensor:
    """Mean next-move cross-entropy of a batch of games [batch, moves] (padding is never a target)."""
    logits = model(input_ids=tokens).logits[:, :-1]  # [batch, moves - 1, vocab]
    target = tokens[:, 1:].clone()  # [batch, moves - 1]
    target[target == 0] = -100
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)


def train(games: Games, out: str | Path, *, config=None, steps: int = 20_000, batch_size: int = 512,
          lr: float = 1e-3, warmup: int = 500, weight_decay: float = 0.01, seed: int = 0, device: str = "cpu",
          save_every: int = 1000, resume: bool = True, progress: bool = False, precision: str = "fp32",
          compile: bool = False, log: Callable[[str], None] = lambda text: None):
    """Train (or resume) an Othello-GPT on `games`; returns the model (in `out`: `config.json`,
    `model.safetensors`, `state.pt` for resuming, `curve.json`)."""
    from transformers import GPT2LMHeadModel

    if precision not in PRECISIONS:
        raise ValueError(f"precision is one of {PRECISIONS}, not {precision!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or model_config(games.size)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(device)
    step_loss = _step_loss(model, device, precision, compile)
    opt = _optimizer(model, lr, weight_decay, device)
    curve: list[dict] = []
    step = 0
    state_file = out / "state.pt"
    if resume and state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, curve = state["step"], state["curve"]
        log(f"resumed at step {step}")
    data = torch.from_numpy(games.tokens.astype(np.int64))  # [game, moves]
    rng = np.random.default_rng([seed, step])  # a resumed run draws fresh, still seeded, batches

    def rate(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))

    model.train()
    start, window = time.perf_counter(), []
    bar = _bar(progress, steps, step)
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr * rate(step)
        batch = data[rng.integers(0, len(data), batch_size)].to(device)
        loss = step_loss(batch)
        _update(model, opt, loss)
        step += 1
        window.append(loss.detach())  # read every 100 steps: a read per step would wait for the device
        if step % 100 == 0 or step == steps:
            curve.append({"step": step, "loss": torch.stack(window).mean().item(), "seconds": round(time.perf_counter() - start, 1)})
            window = []
            bar(step, curve[-1]["loss"])
        if step % save_every == 0 or step == steps:
            _save(model, opt, step, curve, out)
    bar(None, None)
    model.eval()
    return model


PRECISIONS = ("fp32", "bf16")


def _optimizer(model, lr: float, weight_decay: float, device: str) -> torch.optim.AdamW:
    fused = torch.device(device).type == "cuda"  # one kernel per step instead of one per tensor
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98), fused=fused)


def _update(model, opt, loss: Tensor) -> None:
    """One training step on `loss`: its gradients, clipped to norm 1, then AdamW."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _step_loss(model, device: str, precision: str, compile: bool) -> Callable[[Tensor], Tensor]:
    """The training loss of a batch, under bf16 autocast and through a compiled model if asked (the
    uncompiled `model` keeps the weights, so checkpoints are saved from it unchanged)."""
    forward = torch.compile(model) if compile else model
    kind = torch.device(device).type

    def step_loss(batch: Tensor) -> Tensor:
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return loss_on(forward, batch)

    return step_loss


def _save(model, opt, step: int, curve: list, out: Path) -> None:
    model.save_pretrained(out)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "curve": curve},
               out / "state.pt.tmp")
    (out / "state.pt.tmp").replace(out / "state.pt")
    (out / "curve.json").write_text(json.dumps(curve))


def _bar(on: bool, total: int, done: int):
    if not on:
        return lambda step, loss: None
    from rich.progress import Progress

    p = Progress(*Progress.get_default_columns(), "loss {task.fields[loss]}")
    p.start()
    task = p.add_task("training", total=total, completed=done, loss="-")

    def update(step, loss):
        if step is None:
            p.stop()
        else:
            p.update(task, completed=step, loss=f"{loss:.4f}")

    return update


@torch.no_grad()
def evaluate(model, games: Games, *, batch_size: int = 1024) -> dict:
    """Top-1 legal-move rate and legal-set error on `games` (every position that has a next move)."""
    rep = replay(games)
    sq = squares(games.size)
    device = next(model.parameters()).device
    tokens = torch.from_numpy(games.tokens.astype(np.int64))
    hits = set_errors = count = 0
    for i in range(0, len(games), batch_size):
        logits = model(input_ids=tokens[i:i + batch_size].to(device)).logits[..., 1:].float().cpu()  # no padding
        legal = torch.from_numpy(rep.legal[i:i + batch_size][..., sq])  # [game, T, token - 1]
        has_next = legal.any(-1) & (tokens[i:i + batch_size] > 0)  # [game, T]
        top1 = logits.argmax(-1)  # [game, T]
        hits += legal.gather(-1, top1[..., None])[..., 0][has_next].sum().item()
        k = legal.sum(-1)  # [game, T]
        order = logits.argsort(-1, descending=True)
        in_top_k = torch.arange(logits.shape[-1]) < k[..., None]  # [game, T, token - 1]
        wrong = (~legal.gather(-1, order) & in_top_k).sum(-1)  # [game, T]
        set_errors += (wrong[has_next].double() / k[has_next]).sum().item()
        count += has_next.sum().item()
    return {"positions": int(count), "top1_legal": hits / count, "legal_set_error": set_errors / count}
