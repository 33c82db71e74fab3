"""Circuit evaluation by knockout (Wang et al. 2022): a head outside the circuit is mean-ablated, its
output (hook_z) replaced at each position by its mean over the reference distribution's prompts of
the same template ("ABC": the batch's corrupt prompts), so that only the circuit carries
information about the names.

F(M): the model's logit difference; F(C): with every head outside C knocked out. Faithfulness is
F(C) / F(M).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.metrics import logit_diff, read_logits
from mechscope.models.hooked import HookedModel
from mechscope.tasks.batch import ContrastiveBatch

Head = tuple[int, int]


def parse_heads(heads: Iterable[Head | str]) -> set[Head]:
    """{(layer, head)} from tuples or "layer.head" strings."""
    out = set()
    for h in heads:
        layer, head = (int(x) for x in h.split(".")) if isinstance(h, str) else h
        out.add((int(layer), int(head)))
    return out


def group_means(model: HookedModel, batch: ContrastiveBatch) -> dict[str, Tensor]:
    """Each hook_z's mean over the corrupt (reference) prompts of each prompt's group (template),
    per position: {name: [batch, pos, head, d_head]}. Without groups, the whole batch is one group."""
    groups = batch.groups or ("all",) * len(batch)
    names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.corrupt, names_filter=names)
    out = {}
    for name in names:
        z = cache[name]  # [batch, pos, head, d_head]
        mean = torch.empty_like(z)
        for group in set(groups):
            rows = torch.tensor([i for i, g in enumerate(groups) if g == group])
            mean[rows] = z[rows].mean(0, keepdim=True)
        out[name] = mean
    return out


def knockout_hooks(model: HookedModel, keep: set[Head], means: dict[str, Tensor]) -> list:
    """Hooks that mean-ablate every head not in `keep`."""
    hooks = []
    for l in range(model.cfg.n_layers):
        ablate = torch.tensor([(l, h) not in keep for h in range(model.cfg.n_heads)])  # [head]
        if not ablate.any():
            continue
        mean = means[f"blocks.{l}.attn.hook_z"]
        hooks.append((f"blocks.{l}.attn.hook_z",
                      lambda act, hook, mean=mean, ablate=ablate: torch.where(ablate[:, None], mean, act)))
    return hooks


@dataclass(frozen=True)
class Faithfulness:
    model_logit_diff: float  # F(M)
    circuit_logit_diff: float  # F(C)
    n_heads: int  # in the circuit

    @property
    def ratio(self) -> float:
        return self.circuit_logit_diff / self.model_logit_diff

    def __str__(self) -> str:
        return f"F(M) {self.model_logit_diff:.3f}, F(C) {self.circuit_logit_diff:.3f}: faithfulness {self.ratio:.3f} ({self.n_heads} heads)"


def faithfulness(model: HookedModel, batch: ContrastiveBatch, circuit: Iterable[Head | str]) -> Faithfulness:
    """F(C) / F(M) on the clean prompts, every head outside `circuit` mean-ablated over the ABC
    prompts of its template."""
    keep = parse_heads(circuit)
    bad = [h for h in keep if not (0 <= h[0] < model.cfg.n_layers and 0 <= h[1] < model.cfg.n_heads)]
    if bad:
        raise InputError(f"heads {sorted(bad)} are not in this model ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads)")
    means = group_means(model, batch)
    with torch.no_grad():
        full = logit_diff(read_logits(model(batch.clean), batch), batch).mean().item()
        logits = model.run_with_hooks(batch.clean, fwd_hooks=knockout_hooks(model, keep, means))
        circuit_ld = logit_diff(read_logits(logits, batch), batch).mean().item()
    return Faithfulness(model_logit_diff=full, circuit_logit_diff=circuit_ld, n_heads=len(keep))
