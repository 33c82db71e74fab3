"""Resuming a forward from any layer: the decoder layers are called as the model calls them, with
the inputs it gave them on a recorded run, on new residual streams.

Layers before the patched one see no change, so a patched run can start from the cached residual
stream there. Many patched variants run as one batch: variant-major, row k * batch + b.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import Tensor

from mechscope.metrics import at_positions
from mechscope.models.hooked import HookedModel


class LayerInputs:
    """Each decoder layer's inputs on one run: its residual stream and everything else it was given
    (masks, rotary tables, position ids), to call it again on other residual streams."""

    def __init__(self, model: HookedModel, batch_size: int):
        self.model = model
        self.batch_size = batch_size
        self.resid: list[Tensor] = []  # per layer, [batch, pos, d_model]
        self.rest: list[tuple[tuple, dict]] = []
        self._tiled: dict[int, list[tuple[tuple, dict]]] = {}

    @contextmanager
    def recording(self) -> Iterator["LayerInputs"]:
        from transformers.cache_utils import Cache

        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.resid.append(hidden.detach())
            # A KV cache belongs to the recorded run: replayed, it would grow with every call.
            rest = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items() if k != "hidden_states"}
            self.rest.append((tuple(None if isinstance(a, Cache) else a for a in args[1:]), rest))

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.model.adapter.layer_modules()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _tile(self, value: Any, k: int) -> Any:
        """Repeat batch-indexed tensors k times along the batch (variant-major)."""
        if isinstance(value, Tensor):
            if value.ndim >= 2 and value.shape[0] == self.batch_size:
                return value.repeat(k, *([1] * (value.ndim - 1)))
            return value
        if isinstance(value, tuple):
            return tuple(self._tile(v, k) for v in value)
        if isinstance(value, list):
            return [self._tile(v, k) for v in value]
        if isinstance(value, dict):
            return {key: self._tile(v, k) for key, v in value.items()}
        return value

    def tiled(self, k: int) -> list[tuple[tuple, dict]]:
        if k not in self._tiled:
            self._tiled = {k: [self._tile(rest, k) for rest in self.rest]}  # keep one size at a time
        return self._tiled[k]

    def run_layers(self, hidden: Tensor, start: int, stop: int, k: int) -> Tensor:
        """Layers start..stop-1 on hidden [k * batch, pos, d_model]; the residual stream after them."""
        layers = self.model.adapter.layer_modules()
        for layer, (args, kwargs) in zip(layers[start:stop], self.tiled(k)[start:stop]):
            out = layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out  # [k * batch, pos, d_model]
        return hidden

    def run(self, hidden: Tensor, start: int, k: int, read_pos: Tensor) -> Tensor:
        """Layers start.. on hidden [k * batch, pos, d_model]; logits at the read positions, [k, batch, d_vocab]."""
        hidden = self.run_layers(hidden, start, self.model.cfg.n_layers, k)
        final = at_positions(hidden.view(k, self.batch_size, *hidden.shape[1:]), read_pos)  # [k, batch, d_model]
        return self.model.logits_from_resid(final)  # [k, batch, d_vocab]
