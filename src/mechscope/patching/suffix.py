"""Resuming at a position: a patched run that changes nothing before position p runs only positions
p.. of each row, on top of the recorded run's keys and values before p (attention is causal, so the
prefix is the recorded run's, bit for bit).

1. Rows are variant-major (row r = variant * batch + prompt); each row has its own start, so one
   batch can hold variants that patch different positions, or prompts whose patched token differs.
2. Every row runs `length` positions: starts[r] .. starts[r] + length - 1 (past the prompt's end a
   row repeats its last position; nothing reads those rows, and the causal mask keeps them from
   the rows that are read).
3. Each decoder layer is called as the model called it, with its recorded arguments cut to the
   rows' positions (rotary tables, position ids), a key/value cache holding the recorded keys and
   values of every position, and an attention mask that lets row r's position t see the recorded
   keys before starts[r] and the new keys from starts[r] to t, as the recorded mask let t see them
   (causality, padding and sliding windows come from it).

The same Hugging Face modules compute everything; only the positions they are given change.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

# Where a decoder layer takes its key/value cache, by transformers' generations of names.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


class Suffix:
    """Which positions each row runs: starts [rows] and a common length."""

    def __init__(self, starts: Tensor, length: int, batch_size: int, n_pos: int, prompt: Tensor | None = None):
        self.starts = starts  # [rows]
        self.length, self.batch_size, self.n_pos = length, batch_size, n_pos
        # [rows]: the prompt each row runs; by default every prompt once per variant (variant-major)
        self.prompt = torch.arange(len(starts), device=starts.device) % batch_size if prompt is None else prompt
        steps = torch.arange(length, device=starts.device)
        self.positions = (starts[:, None] + steps).clamp(max=n_pos - 1)  # [rows, length]
        self._masks: dict[int, Tensor] = {}

    @classmethod
    def through(cls, starts: Tensor, read_pos: Tensor, batch_size: int, n_pos: int,
                prompt: Tensor | None = None) -> "Suffix":
        """Rows from starts [rows] to the furthest read position after them."""
        prompt = torch.arange(len(starts), device=starts.device) % batch_size if prompt is None else prompt
        length = int((read_pos.to(starts.device)[prompt] - starts).max().clamp(min=0)) + 1
        return cls(starts, length, batch_size, n_pos, prompt)

    def gather(self, t: Tensor) -> Tensor:
        """A recorded [batch (or 1), pos, ...] tensor at each row's positions: [rows, length, ...]."""
        prompt = self.prompt if t.shape[0] > 1 else torch.zeros_like(self.prompt)
        return t[prompt.to(t.device)[:, None], self.positions.to(t.device)]

    def first(self, t: Tensor) -> Tensor:
        """A recorded [batch, pos, ...] tensor at each row's start: [rows, ...]."""
        return t[self.prompt.to(t.device), self.starts.to(t.device)]

    def mask(self, recorded: Tensor | None, dtype: torch.dtype, device) -> Tensor:
        """The additive attention mask [rows, 1, length, pos + length] over (recorded keys, new keys)."""
        key = id(recorded)
        if key not in self._masks:
            n, length = self.n_pos, self.length
            if recorded is None:  # the plain causal mask
                allowed = torch.ones(1, n, n, dtype=torch.bool, device=device).tril()
            else:  # [batch or 1, 1, n, n]: boolean (True: attend) or additive (0: attend)
                allowed = recorded[:, 0] if recorded.dtype == torch.bool else recorded[:, 0] == 0
                dtype = dtype if recorded.dtype == torch.bool else recorded.dtype
            prompt = (self.prompt if allowed.shape[0] > 1 else torch.zeros_like(self.prompt)).to(device)
            positions = self.positions.to(device)
            rows = allowed[prompt[:, None], positions]  # [rows, length, n]: what each position may see
            old = rows & (torch.arange(n, device=device) < self.starts.to(device)[:, None, None])  # [rows, length, n]
            new = rows.gather(2, positions[:, None, :].expand(-1, length, -1))  # [rows, length, length]
            new &= torch.ones(length, length, dtype=torch.bool, device=device).tril()
            both = torch.cat([old, new], -1)  # [rows, length, n + length]
            self._masks[key] = torch.zeros(both.shape, dtype=dtype, device=device).masked_fill(
                ~both, torch.finfo(dtype).min)[:, None]
        return self._masks[key]


def length_buckets(lengths: Tensor, buckets: int, least: int = 8) -> list[Tensor]:
    """Indices of `lengths` [n] (the positions each prompt runs) in up to `buckets` groups of
    consecutive lengths, cut where the positions run (each group as long as its longest member)
    add up to the fewest; no group of fewer than `least` members (small batches run matmuls
    slowly), and no cut that saves nothing."""
    order = torch.argsort(lengths.cpu(), stable=True)
    length = lengths.cpu()[order].tolist()  # ascending
    n = len(order)
    # fewest[(i, g)]: (positions run, previous cut) for the first i members in g groups
    fewest: dict[tuple[int, int], tuple[int, int]] = {(0, 0): (0, 0)}
    for g in range(1, max(1, buckets) + 1):
        for i in range(least if g > 1 or n >= least else n, n + 1):
            options = [(fewest[(k, g - 1)][0] + (i - k) * length[i - 1], k)
                       for k in range(0, i - least + 1 if g > 1 else 1) if (k, g - 1) in fewest]
            if options:
                fewest[(i, g)] = min(options)
    g = min((g for g in range(1, buckets + 1) if (n, g) in fewest), key=lambda g: (fewest[(n, g)][0], g))
    cuts, i = [], n
    for g in range(g, 0, -1):
        k = fewest[(i, g)][1]
        cuts.append(order[k:i])
        i = k
    return cuts[::-1]


class LayerCall:
    """One decoder layer's recorded arguments by name, to call it again on a suffix."""

    def __init__(self, layer: nn.Module, args: tuple, kwargs: dict):
        params = list(inspect.signature(layer.forward).parameters)
        self.layer = layer
        self.arguments = dict(zip(params[1:], args)) | kwargs  # positional ones after hidden_states, named
        self.cache_name = next((n for n in CACHE_ARGUMENTS if n in params or n in kwargs), None)

    def run(self, hidden: Tensor, cache) -> Tensor:
        """The layer on the whole recorded sequence, filling `cache` with its keys and values."""
        out = self.layer(hidden, **{**self.arguments, self.cache_name: cache})
        return out[0] if isinstance(out, tuple) else out

    def run_suffix(self, hidden: Tensor, suffix: Suffix, cache) -> Tensor:
        """The layer on hidden [rows, length, d_model] at the suffix's positions."""
        arguments = {name: cache if name == self.cache_name else _cut(name, value, suffix, hidden)
                     for name, value in self.arguments.items()}
        out = self.layer(hidden, **arguments)
        return out[0] if isinstance(out, tuple) else out

    def resumable(self, n_pos: int) -> bool:
        """Whether run_suffix understands every argument: a cache to fill, and no tensor over positions
        that it would not know how to cut (such as a 1-d cache_position)."""
        return self.cache_name is not None and all(_known(n, v, n_pos) for n, v in self.arguments.items())


def _cut(name: str | None, value, suffix: Suffix, hidden: Tensor):
    """A recorded layer argument cut to the suffix's positions. (A plain function: a recursive
    closure would be a reference cycle holding each call's keys and values until the garbage
    collector ran.)"""
    if name == "attention_mask":
        return suffix.mask(value, hidden.dtype, hidden.device)
    if name == "alibi" and isinstance(value, Tensor):  # BLOOM's [batch * head, 1, key]: over the recorded keys
        heads = value.shape[0] // suffix.batch_size  # and the new ones, as the mask's keys are
        per_row = value.view(suffix.batch_size, heads, 1, -1)[suffix.prompt.to(value.device)]  # [rows, head, 1, pos]
        at = suffix.positions.to(value.device)[:, None, None, :].expand(-1, heads, 1, -1)  # [rows, head, 1, length]
        return torch.cat([per_row, per_row.gather(-1, at)], -1).flatten(0, 1)  # [rows * head, 1, pos + length]
    if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[1] == suffix.n_pos \
            and value.shape[0] in (1, suffix.batch_size):
        return suffix.gather(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(None, v, suffix, hidden) for v in value)
    return value


def _known(name: str | None, value, n_pos: int) -> bool:
    """Whether `_cut` knows how to cut a recorded argument."""
    if isinstance(value, (tuple, list)):
        return all(_known(None, v, n_pos) for v in value)
    if isinstance(value, dict):
        return False
    if not isinstance(value, Tensor) or name in ("attention_mask", "alibi"):
        return True
    return n_pos not in value.shape or (value.ndim >= 2 and value.shape[1] == n_pos)
