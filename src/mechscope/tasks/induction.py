"""Repeated random tokens: [BOS where the tokenizer adds one] + seq + seq, the standard probe of
previous-token, duplicate-token and induction heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel


def induction(model: "HookedModel", n: int, *, length: int = 20, seed: int = 0) -> tuple[Tensor, int]:
    """(tokens [n, prefix + 2 * length], prefix): random non-special tokens, repeated once."""
    generator = torch.Generator().manual_seed(seed)
    special = set(model.tokenizer.all_special_ids) if model.tokenizer is not None else set()
    allowed = torch.tensor([i for i in range(min(model.cfg.d_vocab, 50_000)) if i not in special])
    seq = allowed[torch.randint(len(allowed), (n, length), generator=generator)]  # [n, length]
    prefix = model.to_tokens("")[0].cpu() if model.tokenizer is not None else torch.zeros(0, dtype=torch.long)
    tokens = torch.cat([prefix.expand(n, -1), seq, seq], dim=1)  # [n, prefix + 2 * length]
    return tokens.to(model.device), prefix.numel()
