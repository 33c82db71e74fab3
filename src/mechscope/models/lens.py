"""Lenses: how to read an activation out of a module's input or output, and how to write it back.

A hook site is a module plus a lens. The lens's `get` turns what the module produced (or received)
into the activation in TransformerLens layout, e.g. `[batch, pos, head, d_head]`; `put` builds the
module's value again around a new activation. Lenses compose with `>>`, so each adapter describes
its layout in one line per site (`OUT >> chunk(0, 3) >> heads(64)` is GPT-2's query).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Lens:
    get: Callable[[Any], Any]
    put: Callable[[Any, Any], Any]

    def __rshift__(self, inner: "Lens") -> "Lens":
        return Lens(
            get=lambda v: inner.get(self.get(v)),
            put=lambda v, a: self.put(v, inner.put(self.get(v), a)),
        )


# A module's output, as it is.
OUT = Lens(get=lambda v: v, put=lambda v, a: a)

# The first element of a tuple output (attention modules return (output, weights)).
FIRST = Lens(
    get=lambda v: v[0] if isinstance(v, tuple) else v,
    put=lambda v, a: (a, *v[1:]) if isinstance(v, tuple) else a,
)


def _hidden_get(value: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = value
    return args[0] if args else kwargs["hidden_states"]


def _hidden_put(value: tuple[tuple, dict], a: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = value
    if args:
        return (a, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": a}


# A module's first input (pre-hooks see `(args, kwargs)`); layers take `hidden_states` either way.
IN = Lens(get=_hidden_get, put=_hidden_put)


def heads(d_head: int) -> Lens:
    """[..., n * d_head] <-> [..., n, d_head]."""
    return Lens(
        get=lambda v: v.view(*v.shape[:-1], -1, d_head),
        put=lambda v, a: a.reshape(v.shape),
    )


# [batch, head, pos, d] <-> [batch, pos, head, d] (modules that run after the heads are transposed).
TRANSPOSED = Lens(get=lambda v: v.transpose(1, 2), put=lambda v, a: a.transpose(1, 2))


def chunk(i: int, n: int) -> Lens:
    """The i-th of n equal parts of the last dimension (fused q/k/v projections)."""

    def get(v: torch.Tensor) -> torch.Tensor:
        return v.chunk(n, dim=-1)[i]

    def put(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        parts = list(v.chunk(n, dim=-1))
        parts[i] = a
        return torch.cat(parts, dim=-1)

    return Lens(get=get, put=put)


def span(start: int, stop: int) -> Lens:
    """Columns start:stop of the last dimension (fused projections whose parts differ in size)."""

    def put(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.cat([v[..., :start], a.reshape(*v.shape[:-1], stop - start), v[..., stop:]], dim=-1)

    return Lens(get=lambda v: v[..., start:stop], put=put)


def scaled(factor: float) -> Lens:
    """A value times `factor` (Granite's multipliers on what enters the residual stream); a written
    value is divided by it on its way back."""
    return Lens(get=lambda v: v * factor, put=lambda v, a: a / factor)
