"""Head detectors: how much each head attends where a previous-token, duplicate-token or induction
head would, on repeated random tokens (`tasks.induction`); where each head looks from a prompt's read
position (`attention_from_end`); and whether its OV circuit copies the token it attends to
(`copy_scores`).

On [prefix, s_1 .. s_L, s_1 .. s_L], for a query at position q:
- previous-token: the weight on q - 1 (every q after the first token);
- duplicate-token: the weight on q - L, the same token's earlier occurrence (second half);
- induction: the weight on q - L + 1, the token that followed that occurrence (second half).
Each score is that weight averaged over queries and prompts, in [0, 1]. TransformerLens's
`detect_head` (error measure "mul") divides the same attention mass by every query of the sequence,
not only the eligible ones; `scale="all_queries"` gives its scale (same ranking, smaller numbers:
times eligible / all queries).
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.metrics import at_positions, widen
from mechscope.models.hooked import HookedModel, technique
from mechscope.result import Result
from mechscope.tasks.batch import ContrastiveBatch
from mechscope.tasks.induction import induction

KINDS = ("previous_token", "duplicate_token", "induction")


@technique
def head_scores(model: HookedModel, *, n: int = 8, length: int = 20, seed: int = 0,
                scale: str = "eligible") -> dict[str, Result]:
    """{kind: Result (layer x head)} for the three detectors, from one forward; `scale` "eligible"
    (the mean over the queries a detector applies to) or "all_queries" (TransformerLens's)."""
    if scale not in ("eligible", "all_queries"):
        raise InputError(f"scale is 'eligible' or 'all_queries' (TransformerLens's detect_head), not {scale!r}")
    start = time.perf_counter()
    tokens, prefix = induction(model, n, length=length, seed=seed)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"),
                                        stop_at_layer=model.cfg.n_layers)  # no logits
    pattern = torch.stack([cache["pattern", l] for l in range(model.cfg.n_layers)])  # [layer, batch, head, q, k]
    n_pos = tokens.shape[1]
    second = torch.arange(prefix + length, n_pos)  # queries in the repeat
    targets = {
        "previous_token": (torch.arange(1, n_pos), torch.arange(0, n_pos - 1)),
        "duplicate_token": (second, second - length),
        "induction": (second, second - length + 1),
    }
    labels = head_labels(model)
    out = {}
    for kind, (q, k) in targets.items():
        weight = pattern[:, :, :, q, k]  # [layer, batch, head, queries]
        values = widen(weight).mean((1, 3)) * (len(q) / n_pos if scale == "all_queries" else 1)
        out[kind] = Result(values=values, axes=("layer", "head"), labels=labels,
                           technique=f"{kind} score", model=model.cfg.model_name, n_prompts=n,
                           seconds=time.perf_counter() - start,
                           extra={"length": length, "seed": seed, "scale": scale})
    return out


def head_labels(model: HookedModel) -> dict[str, list[str]]:
    """Labels of a layer x head result."""
    return {"layer": [str(l) for l in range(model.cfg.n_layers)], "head": [str(h) for h in range(model.cfg.n_heads)]}


def attention_from_end(model: HookedModel, batch: ContrastiveBatch, positions: dict[str, Tensor]) -> dict[str, Result]:
    """{key: Result (layer x head)}: each head's attention weight from each prompt's read position to
    `positions[key]` (one position per prompt, e.g. IOI's IO, S1, S2), averaged over prompts."""
    start = time.perf_counter()
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.clean, names_filter=lambda name: name.endswith("hook_pattern"),
                                        stop_at_layer=model.cfg.n_layers)  # no logits
    rows = torch.arange(len(batch))
    out = {}
    for key, pos in positions.items():
        weight = torch.stack([cache["pattern", l][rows, :, batch.read_pos, pos]
                              for l in range(model.cfg.n_layers)])  # [layer, batch, head]
        out[key] = Result(values=widen(weight).mean(1), axes=("layer", "head"), labels=head_labels(model),
                          technique=f"attention END -> {key}", model=model.cfg.model_name, n_prompts=len(batch),
                          seconds=time.perf_counter() - start)
    return out


def copy_scores(
    model: HookedModel, batch: ContrastiveBatch, positions: dict[str, Tensor], *, k: int = 5,
    heads: Iterable[tuple[int, int]] | None = None,
) -> dict[str, Result]:
    """The copy scores of each head's OV circuit (Wang et al. 2022, section 3.3): if the head attended
    only to the token at `positions[key]`, would its output put that token's logit in the top k
    ("copy") or in the bottom k ("negative_copy": the head suppresses what it reads)?

    For each prompt and each position given (e.g. IOI's IO and S1), the head's value vector there
    (the real residual stream of its layer, through its own norm and W_V) goes through W_O, the final
    norm and the unembedding; a score is the fraction of cases that hit. The paper takes the residual
    after the first MLP; each layer's own residual is what the head really reads. heads: only these
    (the other cells are NaN).
    """
    start = time.perf_counter()
    cfg, a = model.cfg, model.adapter
    wanted = {(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)} if heads is None else set(heads)
    layers = sorted({l for l, _ in wanted})
    names = [f"blocks.{l}.attn.hook_v" for l in layers]
    wide = torch.promote_types(model.dtype, torch.float32)
    scores = {kind: torch.full((cfg.n_layers, cfg.n_heads), float("nan"), dtype=wide)
              for kind in ("copy", "negative_copy")}
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.clean, names_filter=names, stop_at_layer=model.cfg.n_layers)
        rows = torch.arange(len(batch))
        keys = list(positions.values())
        tokens = torch.cat([batch.clean[rows, pos] for pos in keys])  # [case]
        for l, name in zip(layers, names):
            hs = sorted(h for wl, h in wanted if wl == l)
            v = torch.cat([at_positions(cache[name].flatten(2), pos) for pos in keys])  # [case, kv_head * d_head]
            v = v.reshape(len(v), cfg.n_kv_heads, cfg.d_head).repeat_interleave(cfg.n_heads // cfg.n_kv_heads, 1)
            result = a.head_results(l, v[:, None])[:, 0]  # [case, head, d_model]: each head's write
            for h in hs:  # one head's logits at a time: [case, d_vocab] is large enough
                logits = model.logits_from_resid(result[:, h])  # [case, d_vocab]
                own = logits.gather(-1, tokens[:, None])  # [case, 1]
                scores["copy"][l, h] = ((logits > own).sum(-1) < k).to(wide).mean().cpu()
                scores["negative_copy"][l, h] = ((logits < own).sum(-1) < k).to(wide).mean().cpu()
    return {kind: Result(values=values, axes=("layer", "head"), labels=head_labels(model),
                         technique=kind.replace("_", " ") + " score", model=cfg.model_name, n_prompts=len(batch),
                         seconds=time.perf_counter() - start, extra={"k": k, "positions": list(positions)})
            for kind, values in scores.items()}
