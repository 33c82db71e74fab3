"""ActivationCache: the activations of one forward, by hook name, with the residual-stream algebra
direct logit attribution needs (stacking, decomposing, folding the final norm)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.metrics import widen
from mechscope.models.adapters.base import norm_weight
from mechscope.models.sites import unknown_name_error

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel

# Short names, as in TransformerLens: cache["resid_pre", 3] is cache["blocks.3.hook_resid_pre"].
_SHORT = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "scale": "ln_final.hook_scale",
    "logits": "hook_logits",
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "post": "blocks.{}.mlp.hook_post",
    **{k: f"blocks.{{}}.attn.hook_{k}" for k in ("q", "k", "v", "z", "pattern", "result")},
}


class ActivationCache:
    """Activations by hook name. Index with a full name or TransformerLens's (short name, layer)."""

    def __init__(self, store: dict[str, Tensor], model: "HookedModel"):
        self._store = store
        self.model = model

    # ---- dict-like ---------------------------------------------------------------------------
    def _name(self, key: str | tuple[str, int]) -> str:
        if isinstance(key, tuple):
            short, layer = key
            n = self.model.cfg.n_layers
            if layer is not None and not -n <= layer < n:
                raise IndexError(f"layer {layer} is out of range for a {n}-layer model (0..{n - 1}, or -{n}..-1)")
            layer = layer % n if layer is not None else layer
            return _SHORT.get(short, short).format(layer)
        return _SHORT.get(key, key) if "{}" not in _SHORT.get(key, key) else key

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:
        name = self._name(key)
        if name not in self._store:
            if name in self.model.hook_names:
                raise KeyError(f"{name!r} was not cached; run_with_cache(..., names_filter=...) must include it")
            raise unknown_name_error(name, self.model.hook_names)
        return self._store[name]

    def __contains__(self, key) -> bool:
        return self._name(key) in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self):
        return self._store.keys()

    def values(self):
        return self._store.values()

    def items(self):
        return self._store.items()

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {', '.join(list(self._store)[:4])}, ...)"

    def to(self, device: str | torch.device) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self._store.items()}, self.model)

    # ---- the residual stream ------------------------------------------------------------------
    def _layers(self, layer: int | None) -> range:
        n = self.model.cfg.n_layers
        return range(n if layer is None or layer == -1 else layer)

    def stack_head_results(
        self, layer: int = -1, *, return_labels: bool = False, apply_ln: bool = False, positions: Tensor | None = None
    ) -> Float[Tensor, "component batch pos d_model"] | tuple[Tensor, list[str]]:
        """Every head's write to the residual stream for the layers before `layer` (-1: all), stacked
        as components "L{l}H{h}". Uses cached `hook_result` where present, else computes it from
        `hook_z` and the output projection (the attention bias is not a head's: it is left out).
        `positions` [batch]: only each prompt's one position, [component, batch, d_model] (what direct
        logit attribution reads, without the whole [component, batch, pos, d_model] stack)."""
        a = self.model.adapter
        parts, labels = [], []
        for l in self._layers(layer):
            result = self._store.get(f"blocks.{l}.attn.hook_result")
            if result is None:
                z = self._at(self[f"blocks.{l}.attn.hook_z"], positions)  # [batch, pos (or 1), head, d_head]
                with torch.no_grad():
                    result = a.head_results(l, z)  # [batch, pos (or 1), head, d_model]
            else:
                result = self._at(result, positions)
            parts.append(result.permute(2, 0, 1, 3))  # [head, batch, pos (or 1), d_model]
            labels += [f"L{l}H{h}" for h in range(self.model.cfg.n_heads)]
        stack = torch.cat(parts) if parts else torch.empty(0)
        stack = stack[:, :, 0] if positions is not None and parts else stack
        return self._finish(stack, labels, return_labels, apply_ln, positions)

    def decompose_resid(
        self, layer: int = -1, *, return_labels: bool = False, apply_ln: bool = False, positions: Tensor | None = None
    ) -> Float[Tensor, "component batch pos d_model"] | tuple[Tensor, list[str]]:
        """The residual stream before `layer` (-1: the final one) as the sum of its parts: the
        embeddings, then each layer's attention and MLP outputs. The parts sum to `resid_pre` of
        `layer` (or the last `resid_post`). `positions` [batch]: each prompt's one position only."""
        names, labels = ["hook_embed"], ["embed"]
        if "hook_pos_embed" in self.model.hook_names:
            names.append("hook_pos_embed")  # [batch, pos, d_model]
            labels.append("pos_embed")
        for l in self._layers(layer):
            names += [f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"]
            labels += [f"{l}_attn_out", f"{l}_mlp_out"]
        parts = [self._at(self[n], positions)[:, 0] if positions is not None else self[n] for n in names]
        return self._finish(torch.stack(parts), labels, return_labels, apply_ln, positions)

    @staticmethod
    def _at(act: Tensor, positions: Tensor | None) -> Tensor:
        """act [batch, pos, ...] at one position per prompt, keeping a pos axis of 1 (all of it if None)."""
        if positions is None:
            return act
        return act[torch.arange(len(act), device=act.device), positions.to(act.device)][:, None]

    def accumulated_resid(
        self, layer: int = -1, *, return_labels: bool = False, apply_ln: bool = False
    ) -> Float[Tensor, "layer batch pos d_model"] | tuple[Tensor, list[str]]:
        """The residual stream at the start of each layer before `layer` (-1: all, plus the final
        `resid_post`), stacked: what the logit lens reads."""
        n = self.model.cfg.n_layers
        layers = self._layers(layer)
        parts = [self[f"blocks.{l}.hook_resid_pre"] for l in layers]
        labels = [f"{l}_pre" for l in layers]
        if layer in (-1, None, n):
            parts.append(self[f"blocks.{n - 1}.hook_resid_post"])
            labels.append("final_post")
        return self._finish(torch.stack(parts), labels, return_labels, apply_ln)

    def apply_ln_to_stack(
        self, residual_stack: Float[Tensor, "... batch pos d_model"], positions: Tensor | None = None
    ) -> Float[Tensor, "... batch pos d_model"]:
        """Fold the final norm into a stack of residual-stream parts, with the scale it had on this
        forward (`ln_final.hook_scale`): center (LayerNorm only), divide by the scale, multiply by the
        norm's weight. Then `stack @ model.W_U` is each part's direct contribution to the logits;
        over a full decomposition these sum, with the norm's bias times W_U and b_U, to the logits.
        """
        a = self.model.adapter
        norm = a.module(a.final_norm)
        x = residual_stack
        if a.norm_kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        scale = self["ln_final.hook_scale"]  # [batch, pos, 1]
        if positions is not None:  # a stack [..., batch, d_model] at one position per prompt
            scale = self._at(scale, positions)[:, 0]  # [batch, 1]
        out = widen(x) / scale * widen(norm_weight(a.norm_kind, norm))  # a linear fold: as wide as the model
        return out.to(residual_stack.dtype)

    def _finish(self, stack: Tensor, labels: list[str], return_labels: bool, apply_ln: bool,
                positions: Tensor | None = None):
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, positions)
        return (stack, labels) if return_labels else stack
