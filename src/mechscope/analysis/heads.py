"""Head detectors: how much each head attends where a previous-token, duplicate-token or induction
head would, on repeated random tokens (`tasks.induction`).

On [prefix, s_1 .. s_L, s_1 .. s_L], for a query at position q:
- previous-token: the weight on q - 1 (every q after the first token);
- duplicate-token: the weight on q - L, the same token's earlier occurrence (second half);
- induction: the weight on q - L + 1, the token that followed that occurrence (second half).
Each score is that weight averaged over queries and prompts, in [0, 1].
"""

from __future__ import annotations

import time

import torch

from mechscope.models.hooked import HookedModel
from mechscope.result import Result
from mechscope.tasks.induction import induction

KINDS = ("previous_token", "duplicate_token", "induction")


def head_scores(model: HookedModel, *, n: int = 8, length: int = 20, seed: int = 0) -> dict[str, Result]:
    """{kind: Result (layer x head)} for the three detectors, from one forward."""
    start = time.perf_counter()
    tokens, prefix = induction(model, n, length=length, seed=seed)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    pattern = torch.stack([cache["pattern", l] for l in range(model.cfg.n_layers)])  # [layer, batch, head, q, k]
    n_pos = tokens.shape[1]
    second = torch.arange(prefix + length, n_pos)  # queries in the repeat
    targets = {
        "previous_token": (torch.arange(1, n_pos), torch.arange(0, n_pos - 1)),
        "duplicate_token": (second, second - length),
        "induction": (second, second - length + 1),
    }
    labels = {"layer": [str(l) for l in range(model.cfg.n_layers)], "head": [str(h) for h in range(model.cfg.n_heads)]}
    out = {}
    for kind, (q, k) in targets.items():
        weight = pattern[:, :, :, q, k]  # [layer, batch, head, queries]
        out[kind] = Result(values=weight.float().mean((1, 3)), axes=("layer", "head"), labels=labels,
                           technique=f"{kind} score", model=model.cfg.model_name, n_prompts=n,
                           seconds=time.perf_counter() - start, extra={"length": length, "seed": seed})
    return out
