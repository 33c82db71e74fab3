"""Resuming a forward from any layer: the decoder layers are called as the model calls them, with
the inputs it gave them on a recorded run, on new residual streams.

Layers before the patched one see no change, so a patched run can start from the cached residual
stream there. Many patched variants run as one batch: variant-major, row k * batch + b. Positions
before the patched one see no change either: recorded with `keys_values=True`, a run can also start
at a position (`Suffix`, patching/suffix.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from mechscope.metrics import at_positions
from mechscope.models.hooked import HookedModel
from mechscope.patching.suffix import LayerCall, Suffix


class LayerInputs:
    """Each decoder layer's inputs on one run: its residual stream and everything else it was given
    (masks, rotary tables, position ids), to call it again on other residual streams."""

    def __init__(self, model: HookedModel, batch_size: int):
        self.model = model
        self.batch_size = batch_size
        self.resid: list[Tensor] = []  # per layer, [batch, pos, d_model]
        self.rest: list[tuple[tuple, dict]] = []
        self.final: Tensor | None = None  # [batch, pos, d_model]: after the last layer
        self.keys: list[Tensor] = []  # per layer, [batch, kv_head, pos, d_head] (with keys_values=True)
        self.values: list[Tensor] = []
        self._calls: list[LayerCall] = []
        self._tiled: dict[int, list[tuple[tuple, dict]]] = {}

    @contextmanager
    def recording(self, keys_values: bool = False) -> Iterator["LayerInputs"]:
        """Record the layers' inputs on the forward run inside the block. With `keys_values`, each
        layer is then called once more on its recorded input to keep its keys and values, so that
        runs can resume at a position (`run(..., suffix=)`); outside the caller's hooks, as recorded."""
        from transformers.cache_utils import Cache

        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.resid.append(hidden.detach())
            # A KV cache belongs to the recorded run: replayed, it would grow with every call.
            rest = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items() if k != "hidden_states"}
            self.rest.append((tuple(None if isinstance(a, Cache) else a for a in args[1:]), rest))

        def record_final(module, args, out):
            self.final = (out[0] if isinstance(out, tuple) else out).detach()

        layers = self.model.adapter.layer_modules()
        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
        handles.append(layers[-1].register_forward_hook(record_final))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
        self._calls = [LayerCall(layer, *rest) for layer, rest in zip(layers, self.rest)]
        if keys_values and self.resumable:
            self._keep_keys_values()

    @property
    def resumable(self) -> bool:
        """Whether runs can resume at a position: the family allows it (`Adapter.resumes_at_a_position`)
        and every layer's arguments are understood."""
        n_pos = self.resid[0].shape[1]
        return (self.model.adapter.resumes_at_a_position and bool(self._calls)
                and all(call.resumable(n_pos) for call in self._calls))

    def _keep_keys_values(self) -> None:
        from transformers import DynamicCache

        cache = DynamicCache()  # no config: full layers, whatever the model's sliding windows
        with torch.no_grad():
            for call, hidden in zip(self._calls, self.resid):
                call.run(hidden, cache)
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]

    def suffix(self, starts: Tensor, read_pos: Tensor, length: int | None = None,
               prompt: Tensor | None = None) -> Suffix:
        """Rows (variant-major) that start at starts [k * batch] and run to their read positions, or
        `length` positions. prompt [rows]: the prompt each row runs, for rows over some prompts only
        (variant-major, the same prompts per variant); by default every prompt once per variant."""
        n_pos = self.resid[0].shape[1]
        if length is not None:
            return Suffix(starts, length, self.batch_size, n_pos, prompt)
        return Suffix.through(starts, read_pos, self.batch_size, n_pos, prompt)

    def _tile(self, value: Any, k: int, done: dict[int, Tensor]) -> Any:
        """Repeat batch-indexed tensors k times along the batch (variant-major); a tensor that every
        layer is given (a mask, rotary tables) is repeated once (`done`, by identity)."""
        if isinstance(value, Tensor):
            if value.ndim >= 2 and value.shape[0] == self.batch_size:
                if id(value) not in done:
                    done[id(value)] = value.repeat(k, *([1] * (value.ndim - 1)))
                return done[id(value)]
            return value
        if isinstance(value, tuple):
            return tuple(self._tile(v, k, done) for v in value)
        if isinstance(value, list):
            return [self._tile(v, k, done) for v in value]
        if isinstance(value, dict):
            per_head = self.model.adapter.per_head_arguments  # [batch * head, ...] (Bloom's alibi)
            return {key: self._tile(v.view(self.batch_size, -1, *v.shape[1:]), k, done).flatten(0, 1)
                    if key in per_head and isinstance(v, Tensor) else self._tile(v, k, done) for key, v in value.items()}
        return value

    def tiled(self, k: int) -> list[tuple[tuple, dict]]:
        if k not in self._tiled:
            done: dict[int, Tensor] = {}
            self._tiled = {k: [self._tile(rest, k, done) for rest in self.rest]}  # keep one size at a time
        return self._tiled[k]

    def run_layers(self, hidden: Tensor, start: int, stop: int, k: int, suffix: Suffix | None = None) -> Tensor:
        """Layers start..stop-1 on hidden [k * batch, pos, d_model]; the residual stream after them.
        With a suffix, hidden is [k * batch, suffix.length, d_model] at the suffix's positions."""
        if suffix is not None:
            for layer in range(start, stop):
                hidden = self._suffix_layer(hidden, layer, suffix)  # [k * batch, length, d_model]
            return hidden
        layers = self.model.adapter.layer_modules()
        for layer, (args, kwargs) in zip(layers[start:stop], self.tiled(k)[start:stop]):
            out = layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out  # [k * batch, pos, d_model]
        return hidden

    def run_joined(self, suffix: Suffix, joins: dict[int, int], read_pos: Tensor, tokens: Tensor | None = None) -> Tensor:
        """Variants that start at different layers, in one batch: joins {layer: how many variants start
        there}, the suffix's rows (variant-major) in order of layer. Each variant joins the batch at its
        layer with the recorded residual stream there and runs from its start position on. Logits at
        the read positions, [k, batch, d_vocab] (or of `tokens`, as `read` says)."""
        b, n_pos, hidden, present = self.batch_size, suffix.n_pos, None, 0
        for layer in range(min(joins), self.model.cfg.n_layers):
            if joins.get(layer):
                rows = slice(present * b, (present + joins[layer]) * b)
                new = Suffix(suffix.starts[rows], suffix.length, b, n_pos).gather(self.resid[layer])  # [rows, length, d_model]
                hidden = new if hidden is None else torch.cat([hidden, new])
                present += joins[layer]
                part = Suffix(suffix.starts[: present * b], suffix.length, b, n_pos)  # the rows present
            hidden = self._suffix_layer(hidden, layer, part)  # [present * batch, length, d_model]
        return self.read(hidden, present, read_pos, suffix, tokens)

    def _suffix_layer(self, hidden: Tensor, layer: int, suffix: Suffix) -> Tensor:
        """One layer on hidden [rows, length, d_model] at the suffix's positions, over a cache of that
        layer's recorded keys and values (every position: the mask hides those the suffix replaces)."""
        from transformers import DynamicCache

        if not self.keys:
            raise RuntimeError("resuming at a position needs recording(keys_values=True) on a resumable model")
        cache = DynamicCache()  # one layer's at a time
        cache.update(self.keys[layer][suffix.prompt], self.values[layer][suffix.prompt], layer)
        return self._calls[layer].run_suffix(hidden, suffix, cache)

    def run(self, hidden: Tensor, start: int, k: int, read_pos: Tensor, suffix: Suffix | None = None,
            tokens: Tensor | None = None) -> Tensor:
        """Layers start.. on hidden [k * batch, pos, d_model]; logits at the read positions, [k, batch, d_vocab].
        With a suffix, a row whose read position comes before its start reads the recorded run."""
        hidden = self.run_layers(hidden, start, self.model.cfg.n_layers, k, suffix)
        return self.read(hidden, k, read_pos, suffix, tokens)

    def read(self, hidden: Tensor, k: int, read_pos: Tensor, suffix: Suffix | None = None,
             tokens: Tensor | None = None) -> Tensor:
        """Logits at the read positions [k, batch, d_vocab] from the last layer's output hidden (with a
        suffix over some prompts only, [k, those prompts, d_vocab]); with tokens [batch, t], only
        those tokens' logits of each prompt, [k, batch, t] (`metrics.narrow`)."""
        if suffix is not None:
            read = read_pos.to(hidden.device)[suffix.prompt.to(hidden.device)]  # [k * batch]
            at = read - suffix.starts.to(hidden.device)  # [k * batch]: index in the suffix
            rows = torch.arange(len(at), device=hidden.device)
            final = hidden[rows, at.clamp(0, suffix.length - 1)]  # [k * batch, d_model]
            before = self.final[suffix.prompt.to(hidden.device), read]  # [k * batch, d_model]
            final = torch.where((at < 0)[:, None], before, final)
            prompts = suffix.prompt[: len(at) // k]  # each variant's prompts, in order
            tokens = None if tokens is None else tokens[prompts.to(tokens.device)]
            return self.model.logits_from_resid(final.view(k, len(at) // k, -1), tokens)  # [k, batch, d_vocab]
        final = at_positions(hidden.view(k, self.batch_size, *hidden.shape[1:]), read_pos)  # [k, batch, d_model]
        return self.model.logits_from_resid(final, tokens)  # [k, batch, d_vocab]
