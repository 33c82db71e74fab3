"""ActivationCache: the activations of one forward, by hook name, with the residual-stream algebra of
direct logit attribution and the logit lens, under TransformerLens's names and signatures.

What matches TransformerLens's ActivationCache: the keys (`cache["resid_pre", 3]`, `cache["scale",
1, "ln1"]`, `cache["k6"]`), and the methods `accumulated_resid`, `decompose_resid`,
`stack_head_results`, `stack_neuron_results`, `stack_activation`, `get_full_resid_decomposition`,
`apply_ln_to_stack`, `logit_attrs`, `compute_head_results`, `remove_batch_dim`,
`apply_slice_to_batch_dim` and `toggle_autodiff`, with the same arguments, shapes, labels and layer
conventions (`layer` counts the layers before it; -1 and None mean all of them, the final stream).

Where it differs, on purpose (tests/compat runs both on one model):
- `model.W_U` is the model's own unembedding, not one with the final norm's weight folded in, so
  `apply_ln_to_stack` multiplies by the norm's weight after dividing by its scale. The product with
  `W_U` is the same number as TransformerLens's (with its default `fold_ln`).
- `recompute_ln=True` runs the model's own norm module on each component (its weight and bias);
  add `model.b_U` to the product with `W_U` and the last row of a logit lens is the logits.
- A remainder (`incl_remainder=True`) is what makes the stack sum to the stream entering `layer`;
  TransformerLens's `layer=0` remainder is the final stream instead.
- On parallel-residual models (GPT-NeoX, GPT-J, Phi) the MLP reads the same stream as attention,
  so `mlp_input=True` adds no attention output of the layer itself, and there is no `resid_mid`.
- `positions=` ([batch], mechscope's) keeps one position per prompt, without the full stack.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError, UnsupportedModelError
from mechscope.metrics import widen
from mechscope.models.adapters.base import norm_weight
from mechscope.models.sites import unknown_name_error

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel

# TransformerLens's shorthand (`utils.get_act_name`): aliases, and which sites live in attn. or mlp.
_ALIAS = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
          "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_IN_ATTN = {"q", "k", "v", "z", "rot_q", "rot_k", "result", "pattern", "attn_scores"}
_IN_MLP = {"pre", "post", "mid", "pre_linear", "router"}
_LAYER_TYPE = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}


def _slice(x: Tensor, pos_slice, dim: int) -> Tensor:
    """TransformerLens's Slice on one dimension: None keeps all, an int picks one (dropping the
    dimension), a tuple is slice(*tuple), a slice slices, a list or tensor of indices gathers."""
    if pos_slice is None:
        return x
    if isinstance(pos_slice, Tensor) and pos_slice.ndim == 0:
        pos_slice = int(pos_slice)
    if isinstance(pos_slice, int):
        return x.select(dim, pos_slice)
    if isinstance(pos_slice, (tuple, slice)):
        index = [slice(None)] * x.ndim
        index[dim] = pos_slice if isinstance(pos_slice, slice) else slice(*pos_slice)
        return x[tuple(index)]
    return x.index_select(dim, torch.as_tensor(pos_slice, device=x.device).long())


class ActivationCache:
    """Activations by hook name. Index with a full name or TransformerLens's shorthand."""

    def __init__(self, store: dict[str, Tensor], model: "HookedModel", has_batch_dim: bool = True):
        self._store = store
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ---- dict-like ---------------------------------------------------------------------------
    def _name(self, key) -> str:
        """A full hook name from a full name, "resid_pre" style shorthand ("k6", "scale4ln1"), or a
        (name, layer[, layer_type]) tuple; negative layers count from the end."""
        if isinstance(key, str):
            if "." in key or key.startswith("hook_"):
                return key
            match = re.fullmatch(r"([a-z]+)(\d+)([a-z]?.*)", key)
            name, layer, kind = (match[1], int(match[2]), match[3]) if match else (key, None, None)
        else:
            name, layer, *rest = key
            kind = rest[0] if rest else None
        name = _ALIAS.get(name, name)
        if layer is None:
            return f"ln_final.hook_{name}" if name in ("scale", "normalized") else f"hook_{name}"
        n = self.model.cfg.n_layers
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} is out of range for a {n}-layer model (0..{n - 1}, or -{n}..-1)")
        kind = "attn" if name in _IN_ATTN else "mlp" if name in _IN_MLP else _LAYER_TYPE.get(kind, kind)
        return f"blocks.{layer % n}." + (f"{kind}." if kind else "") + f"hook_{name}"

    def __getitem__(self, key) -> Tensor:
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
        return ActivationCache({k: v.to(device) for k, v in self._store.items()}, self.model, self.has_batch_dim)

    # ---- the batch ---------------------------------------------------------------------------
    def _batch_size(self) -> int:
        return next(iter(self._store.values())).shape[0] if self._store else 1

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch axis of a one-prompt cache, in place (as TransformerLens does)."""
        if not self.has_batch_dim:
            raise InputError("this cache has no batch axis left to remove")
        if self._batch_size() != 1:
            raise InputError(f"remove_batch_dim needs a cache of one prompt, not {self._batch_size()}; "
                             "pick one with apply_slice_to_batch_dim(i)")
        self._store = {k: v[0] for k, v in self._store.items()}
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """A new cache of some prompts: an int picks one (and drops the batch axis), a slice, a tuple
        (slice(*tuple)) or a list/tensor of indices keeps a batch."""
        if not self.has_batch_dim:
            raise InputError("this cache has no batch axis to slice")
        keep = {k: _slice(v, batch_slice, 0) for k, v in self._store.items()}
        one = isinstance(batch_slice, int) or (isinstance(batch_slice, Tensor) and batch_slice.ndim == 0)
        return ActivationCache(keep, self.model, has_batch_dim=not one)

    @staticmethod
    def toggle_autodiff(mode: bool = False) -> None:
        """torch.set_grad_enabled(mode), globally, as TransformerLens's does (with its warning);
        `with torch.no_grad():` is the local way."""
        logging.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)

    # ---- layers and norms --------------------------------------------------------------------
    def _layer(self, layer: int | None) -> int:
        """TransformerLens's layer argument: the number of layers before it, 0..n_layers, where -1
        and None mean n_layers (the final stream) and -2 means n_layers - 1, and so on."""
        n = self.model.cfg.n_layers
        if layer is None:
            return n
        if not -n - 1 <= layer <= n:
            raise IndexError(f"layer {layer} is out of range: 0..{n} (n_layers: the final stream), or -{n + 1}..-1")
        return layer if layer >= 0 else n + 1 + layer

    def _norm(self, layer: int, mlp_input: bool):
        """(norm module, its cached scale's name) of what reads the stream entering `layer`."""
        a, n = self.model.adapter, self.model.cfg.n_layers
        if layer == n:
            if mlp_input:
                raise InputError("mlp_input=True needs a layer below n_layers: the final stream feeds the unembedding")
            return a.module(a.final_norm), "ln_final.hook_scale"
        if a.attn_norm is None:  # OLMo-2: attention and the MLP read the stream itself
            return None, None
        if mlp_input and a.mlp_norm != a.attn_norm:
            return a.module(a.mlp_norm, layer), f"blocks.{layer}.ln2.hook_scale"
        return a.module(a.attn_norm, layer), f"blocks.{layer}.ln1.hook_scale"  # GPT-J, Phi: one norm for both

    def _mid(self, layer: int) -> str:
        if self.model.cfg.parallel_residual:
            raise InputError("a parallel-residual model has no resid_mid: attention and MLP both read resid_pre")
        return f"blocks.{layer}.hook_resid_mid"

    def _entering(self, layer: int, mlp_input: bool = False) -> str:
        """The stream entering `layer` (or its MLP): what a full decomposition sums to."""
        n = self.model.cfg.n_layers
        if layer == n:
            return f"blocks.{n - 1}.hook_resid_post"
        if mlp_input and not self.model.cfg.parallel_residual:
            return self._mid(layer)
        return f"blocks.{layer}.hook_resid_pre"

    def _pos(self, act: Tensor, pos_slice, positions: Tensor | None, dim: int = -2) -> Tensor:
        """act at the positions asked for: `pos_slice` (TransformerLens's) or `positions` [batch]
        (mechscope's: one position per prompt, the pos axis dropped)."""
        if positions is None:
            return _slice(act, pos_slice, dim)
        if pos_slice is not None:
            raise InputError("give pos_slice or positions, not both")
        return act[torch.arange(len(act), device=act.device), positions.to(act.device)]

    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "component *batch_pos d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice=None,
        batch_slice=None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
        *,
        positions: Tensor | None = None,
    ) -> Float[Tensor, "component *batch_pos d_model"]:
        """Treat each component as the input of the norm that reads the stream entering `layer` (ln1,
        or ln2 with `mlp_input`; the final norm for -1/None/n_layers) and apply it with the scale it
        had on this forward: center (LayerNorm), divide by the cached scale, multiply by the norm's
        weight. Linear, so the components still sum to the normalized stream less the norm's bias,
        and `stack @ model.W_U` is each part's direct contribution to the logits. `pos_slice`,
        `batch_slice` or `positions` say which of the cached scales the stack was taken at.
        `recompute_ln=True`: run the norm module itself on each component (the logit lens)."""
        layer = self._layer(layer)
        x = residual_stack
        if has_batch_dim and batch_slice is not None:
            x = _slice(x, batch_slice, 1)
        norm, scale_name = self._norm(layer, mlp_input)
        if norm is None:  # no norm before this layer (OLMo-2): the layer reads the components as they are
            return x
        if recompute_ln:
            return norm(x)
        if self.model.adapter.norm_kind.startswith("layernorm"):
            x = x - x.mean(-1, keepdim=True)
        scale = self._pos(self[scale_name], pos_slice, positions)  # [batch, pos, 1], as the stack was sliced
        if has_batch_dim and batch_slice is not None:
            scale = _slice(scale, batch_slice, 0)
        out = widen(x) / scale * widen(norm_weight(self.model.adapter.norm_kind, norm))  # as wide as the model
        return out.to(residual_stack.dtype)

    def _finish(self, stack: Tensor, labels: list[str], return_labels: bool, apply_ln: bool, layer: int,
                mlp_input: bool = False, pos_slice=None, positions: Tensor | None = None):
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice, positions=positions)
        return (stack, labels) if return_labels else stack

    def _empty(self, pos_slice, positions) -> Tensor:
        """A stack of no components, shaped as one of the stream: [0, batch, pos, d_model]."""
        like = self._pos(self["hook_embed"], pos_slice, positions)
        return like.new_zeros(0, *like.shape)

    # ---- the residual stream ------------------------------------------------------------------
    def accumulated_resid(
        self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False, pos_slice=None,
        mlp_input: bool = False, return_labels: bool = False,
    ) -> Float[Tensor, "layers_covered *batch_pos d_model"] | tuple[Tensor, list[str]]:
        """The stream entering each layer up to and including `layer` ("{l}_pre"; "{l}_mid" too with
        `incl_mid`, and the MLP input of `layer` with `mlp_input`); all layers and "final_post" for
        -1/None. `apply_ln`: as seen by `layer`'s norm (the final norm, recomputed on each, for the
        logit lens, as TransformerLens does)."""
        layer, n = self._layer(layer), self.model.cfg.n_layers
        names, labels = [], []
        for l in range(layer + 1):
            if l == n:
                names.append(f"blocks.{n - 1}.hook_resid_post")
                labels.append("final_post")
                continue
            names.append(f"blocks.{l}.hook_resid_pre")
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                names.append(self._mid(l))
                labels.append(f"{l}_mid")
        stack = torch.stack([_slice(self[name], pos_slice, -2) for name in names])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self, layer: int | None = None, mlp_input: bool = False, mode: str = "all", apply_ln: bool = False,
        pos_slice=None, incl_embeds: bool = True, return_labels: bool = False, *, positions: Tensor | None = None,
    ) -> Float[Tensor, "component *batch_pos d_model"] | tuple[Tensor, list[str]]:
        """The stream entering `layer` (its MLP, with `mlp_input`; -1/None: the final stream) as the
        sum of its parts: "embed" (and "pos_embed"), then each layer's "{l}_attn_out" and
        "{l}_mlp_out" (`mode`: "all", "attn" or "mlp"). With every part, they sum to that stream."""
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode is 'all', 'attn' or 'mlp', not {mode!r}")
        layer = self._layer(layer)
        self._norm(layer, mlp_input)  # mlp_input at the final stream: refused
        names, labels = [], []
        if incl_embeds:
            names.append("hook_embed")
            labels.append("embed")
            if "hook_pos_embed" in self.model.hook_names:
                names.append("hook_pos_embed")  # [batch, pos, d_model]
                labels.append("pos_embed")
        for l in range(layer):
            for kind in (["attn"] if mode != "mlp" else []) + (["mlp"] if mode != "attn" else []):
                names.append(f"blocks.{l}.hook_{kind}_out")
                labels.append(f"{l}_{kind}_out")
        if mlp_input and mode != "mlp" and not self.model.cfg.parallel_residual:
            names.append(f"blocks.{layer}.hook_attn_out")
            labels.append(f"{layer}_attn_out")
        parts = [self._pos(self[name], pos_slice, positions) for name in names]
        stack = torch.stack(parts) if parts else self._empty(pos_slice, positions)
        return self._finish(stack, labels, return_labels, apply_ln, layer, mlp_input, pos_slice, positions)

    def _head_results(self, l: int) -> Tensor:
        """[batch, pos, head, d_model]: the cached `hook_result`, else computed from `hook_z`."""
        result = self._store.get(f"blocks.{l}.attn.hook_result")
        if result is not None:
            return result
        z = self[f"blocks.{l}.attn.hook_z"]  # [batch, pos, head, d_head]
        with torch.no_grad():
            result = self.model.adapter.head_results(l, z if self.has_batch_dim else z[None])
        return result if self.has_batch_dim else result[0]

    def compute_head_results(self) -> None:
        """Store every layer's `attn.hook_result`, computed from `hook_z` (TransformerLens's method)."""
        for l in range(self.model.cfg.n_layers):
            self._store[f"blocks.{l}.attn.hook_result"] = self._head_results(l)

    def stack_head_results(
        self, layer: int | None = -1, return_labels: bool = False, incl_remainder: bool = False, pos_slice=None,
        apply_ln: bool = False, *, positions: Tensor | None = None,
    ) -> Float[Tensor, "component *batch_pos d_model"] | tuple[Tensor, list[str]]:
        """Every head's write to the residual stream in the layers before `layer` (-1: all), stacked as
        "L{l}H{h}" (the cached `hook_result`, else computed from `hook_z`: the output bias is no
        head's and is left out). `incl_remainder`: one more, the rest of the stream entering `layer`."""
        layer = self._layer(layer)
        parts, labels = [], []
        for l in range(layer):
            result = self._pos(self._head_results(l), pos_slice, positions, dim=-3)  # [batch, pos, head, d_model]
            parts.append(result.movedim(-2, 0))  # [head, batch, pos, d_model]
            labels += [f"L{l}H{h}" for h in range(self.model.cfg.n_heads)]
        stack = torch.cat(parts) if parts else self._empty(pos_slice, positions)
        if incl_remainder:
            stack = self._with_remainder(stack, self._entering(layer), pos_slice, positions)
            labels.append("remainder")
        return self._finish(stack, labels, return_labels, apply_ln, layer, False, pos_slice, positions)

    def _with_remainder(self, stack: Tensor, name: str, pos_slice, positions) -> Tensor:
        whole = self._pos(self[name], pos_slice, positions)  # [batch, pos, d_model]
        return torch.cat([stack, (whole - stack.sum(0))[None]])

    def _neuron_results(self, l: int, pos_slice, neurons: Tensor) -> Tensor:
        """[batch, pos, neuron, d_model]: each neuron's activation times its row of the MLP's output
        projection (through Gemma's post-MLP norm with the scale it had)."""
        a = self.model.adapter
        if a.is_moe(l):
            raise UnsupportedModelError(f"layer {l} is a mixture of experts, fused inside its block: no neurons "
                                        "to stack (use expand_neurons=False, or decompose_resid)")
        post = _slice(self[f"blocks.{l}.mlp.hook_post"], pos_slice, -2)  # [batch, pos, d_mlp]
        w, b = a.mlp_out_affine(l)  # [d_mlp, d_model], [d_model]
        with torch.no_grad():
            parts = post[..., neurons, None] * w[neurons]  # [batch, pos, neuron, d_model]
            if a.mlp_post_norm is None:
                return parts
            if b.abs().max() > 0:
                raise UnsupportedModelError("an MLP output bias inside a post-MLP norm is no neuron's: not stacked")
            return a.post_norm_share(a.mlp_post_norm, l, parts, post @ w)

    def stack_neuron_results(
        self, layer: int | None, pos_slice=None, neuron_slice=None, return_labels: bool = False,
        incl_remainder: bool = False, apply_ln: bool = False, mlp_input: bool = False,
    ) -> Float[Tensor, "component *batch_pos d_model"] | tuple[Tensor, list[str]]:
        """Every MLP neuron's write to the residual stream in the layers before `layer`, stacked as
        "L{l}N{n}" (`neuron_slice`: some neurons of each layer). The output bias is no neuron's.
        Large: [layer * d_mlp, batch, pos, d_model]. `incl_remainder`: the rest of the stream
        entering `layer` (its MLP, with `mlp_input`)."""
        layer = self._layer(layer)
        d_mlp = self.model.cfg.d_mlp
        neurons = torch.arange(d_mlp)
        if neuron_slice is not None:
            neurons = neurons[[neuron_slice]] if isinstance(neuron_slice, int) else _slice(neurons, neuron_slice, 0)
        parts, labels = [], []
        for l in range(layer):
            parts.append(self._neuron_results(l, pos_slice, neurons).movedim(-2, 0))  # [neuron, batch, pos, d_model]
            labels += [f"L{l}N{n}" for n in neurons.tolist()]
        stack = torch.cat(parts) if parts else self._empty(pos_slice, None)
        if incl_remainder:
            stack = self._with_remainder(stack, self._entering(layer, mlp_input), pos_slice, None)
            labels.append("remainder")
        return self._finish(stack, labels, return_labels, apply_ln, layer, mlp_input, pos_slice)

    def stack_activation(self, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None) -> Tensor:
        """One site of every layer before `layer` (-1: all), stacked: [layer, ...]."""
        return torch.stack([self[(activation_name, l, sublayer_type)] for l in range(self._layer(layer))])

    def get_full_resid_decomposition(
        self, layer: int | None = None, mlp_input: bool = False, expand_neurons: bool = True, apply_ln: bool = False,
        pos_slice=None, return_labels: bool = False,
    ) -> Float[Tensor, "component *batch_pos d_model"] | tuple[Tensor, list[str]]:
        """The stream entering `layer` (its MLP, with `mlp_input`) as every head ("L{l}H{h}"), every
        neuron ("L{l}N{n}"; or each MLP, "{l}_mlp_out", without `expand_neurons`), "embed",
        "pos_embed" where there is one, and "bias" (the output biases no head or neuron owns). The
        components sum to that stream exactly."""
        layer = self._layer(layer)
        self._norm(layer, mlp_input)  # mlp_input at the final stream: refused
        own_attn = mlp_input and not self.model.cfg.parallel_residual  # the MLP reads this layer's attention
        heads, labels = self.stack_head_results(layer + own_attn, return_labels=True, pos_slice=pos_slice)
        parts = [heads]
        if expand_neurons:
            neurons, more = self.stack_neuron_results(layer, pos_slice, return_labels=True)
        else:
            neurons, more = self.decompose_resid(layer, mode="mlp", pos_slice=pos_slice, incl_embeds=False,
                                                 return_labels=True)
        parts.append(neurons)
        labels += more
        for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if name in self.model.hook_names:
                parts.append(_slice(self[name], pos_slice, -2)[None])
                labels.append(label)
        bias = self._bias(layer + own_attn, layer if expand_neurons else 0).to(heads)  # [d_model]
        parts.append(bias.expand(1, *heads.shape[1:]))
        labels.append("bias")
        return self._finish(torch.cat(parts), labels, return_labels, apply_ln, layer, mlp_input, pos_slice)

    def _bias(self, attn_layers: int, mlp_layers: int) -> Tensor:
        """The attention output biases of the first `attn_layers` layers plus the MLP output biases
        of the first `mlp_layers` (none behind a post-norm: Gemma has none), [d_model]."""
        a, total = self.model.adapter, torch.zeros(self.model.cfg.d_model, dtype=torch.float64)
        for l in range(attn_layers):
            b = a.b_O(l) if a.attn_post_norm is None else None
            total += 0 if b is None else b.detach().double()
        for l in range(mlp_layers):
            if a.mlp_post_norm is None:
                total += a.mlp_out_affine(l)[1].double()
        return total

    def logit_attrs(
        self, residual_stack: Float[Tensor, "component *batch_pos d_model"], tokens, incorrect_tokens=None,
        pos_slice=None, batch_slice=None, has_batch_dim: bool = True, *, positions: Tensor | None = None,
    ) -> Float[Tensor, "component batch *pos"]:
        """Each component's direct contribution to the logit of `tokens` (minus that of
        `incorrect_tokens`): the final norm applied with its cached scale, then the dot product with
        the tokens' unembedding directions (`model.tokens_to_residual_directions`). `tokens`: a string,
        an id, [batch] (one per prompt) or [batch, pos]."""
        directions = self.model.tokens_to_residual_directions(tokens)  # [d_model], [batch, d_model] or [batch, pos, d_model]
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise InputError(f"tokens and incorrect_tokens must have one shape, not {tuple(directions.shape[:-1])} "
                                 f"and {tuple(wrong.shape[:-1])}")
            directions = directions - wrong
        stack = self.apply_ln_to_stack(residual_stack, -1, False, pos_slice, batch_slice, has_batch_dim,
                                       positions=positions)
        if has_batch_dim and stack.ndim == 4 and directions.ndim == 2 and len(directions) == stack.shape[1]:
            directions = directions[:, None]  # one direction per prompt, the same at every position
        return (stack * directions.to(stack)).sum(-1)
