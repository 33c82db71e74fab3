"""What one head's query, key or value would be if it alone read another residual stream.

A layer's heads all read one stream through one norm. To give each head its own input (an ablated
edge changes what one reader sees), each input goes through its own copy of the norm (the norm
module itself, on [..., reader, d_model]) and then through that head's slice of the projection, and,
on Gemma, the per-head q/k norm. Where a q/k norm spans all heads (OLMo-2, OLMoE), a reader's q is
that norm applied to every head's projection of its input, of which it keeps its own head's: a
projection as wide as the layer's per reader. The slices are read from the projection module itself: it is
affine, so its value on the zero vector is its bias and on the unit vectors its weight; that works
for every layout (separate, fused, interleaved per head) through the adapter's lens, and is checked
against the module on a random input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mechscope.models.adapters.base import norm_scale, norm_weight
from mechscope.models.hooked import HookedModel
from mechscope.models.weights import read_affine


class HeadInputs:
    """Per-head projections of every layer: `value(layer, kind, heads, x)`, and the gradient that
    carries back to each head's own input, `input_grad`."""

    def __init__(self, model: HookedModel):
        self.model = model
        a = model.adapter
        self._norms = [a.pre_norm(l) for l in range(model.cfg.n_layers)]  # (the identity on OLMo-2)
        self._proj: dict[tuple[int, str], tuple[Tensor, Tensor, nn.Module | None]] = {}
        self._folded: dict[tuple[int, str], Tensor] = {}
        self._offsets: dict[tuple[int, str, torch.dtype], Tensor] = {}

    def projection(self, layer: int, kind: str) -> tuple[Tensor, Tensor, nn.Module | None]:
        """(weight [head, d_model, d_head], bias [head, d_head], per-head module after it or None)."""
        key = (layer, kind)
        if key not in self._proj:
            a = self.model.adapter
            place, post = a.qkv_projections()[kind]
            weight, bias = read_affine(a.module(place.path, layer), place.lens, self.model.cfg.d_model,
                                       what=f"the {kind} projection of layer {layer}")  # [d_model, head, d_head]
            self._proj[key] = (weight.permute(1, 0, 2), bias, None if post is None else a.module(post, layer))
        return self._proj[key]

    def value_each(self, layer: int, kind: str, heads: Tensor, x: Tensor) -> Tensor:
        """One head per row: x [..., n, batch, pos, d_model], row i read by head heads[i] ->
        [..., n, batch, pos, d_head]."""
        weight, bias, post = self.projection(layer, kind)
        normed = self._norms[layer](x)  # [..., n, batch, pos, d_model]
        if self.model.adapter.qk_norm_whole and post is not None:
            every = _whole_norm(normed, weight, bias, post).movedim(-2, -4)  # [..., n, head, batch, pos, d_head]
            rows = torch.arange(len(heads), device=x.device)
            return every[..., rows, heads.to(x.device), :, :, :]  # [..., n, batch, pos, d_head]: row i, head heads[i]
        w, b = weight[heads.to(weight.device)], bias[heads.to(bias.device)]  # [n, d_model, d_head], [n, d_head]
        out = torch.einsum("...nbpd,nde->...nbpe", normed, w) + b[:, None, None]  # [..., n, batch, pos, d_head]
        return out if post is None else post.forward(out)

    def value(self, layer: int, kind: str, heads: list[int], x: Tensor) -> Tensor:
        """Heads' q, k or v (k, v per key/value head) when head i reads x[..., i, :].

        x: [..., len(heads), d_model] residual streams (before the norm) -> [..., len(heads), d_head]."""
        weight, bias, post = self.projection(layer, kind)
        normed = self._norms[layer](x)  # [..., n, d_model]: the layer's own norm, one copy per reader
        idx = torch.tensor(heads, device=x.device)
        if self.model.adapter.qk_norm_whole and post is not None:
            every = _whole_norm(normed, weight, bias, post)  # [..., n, head, d_head]
            rows = torch.arange(len(heads), device=x.device)
            return every[..., rows, idx, :]  # [..., n, d_head]: reader i keeps head heads[i]
        out = torch.einsum("...nd,nde->...ne", normed, weight[idx]) + bias[idx]  # [..., n, d_head]
        return out if post is None else post.forward(out)  # forward: the q site may hook this very module

    def input_grad(self, layer: int, parts: list[tuple[str, list[int], Tensor]], x: Tensor,
                   values: list[Tensor] | None = None) -> Tensor | None:
        """The vector-Jacobian product of `value` at x, in closed form: d metric / d (each head's own
        input), given the gradient at its q, k or v. parts: [(kind, heads, grad [batch, pos, n_kind,
        d_head])]; x [batch, pos, d_model] (what every head reads) -> [n, batch, pos, d_model], the
        heads in the order of `parts`. None where a q/k norm follows a projection (Gemma 3, Qwen3,
        OLMo-2): there, autograd through `value` gives it. `values`: see `input_grad_terms`."""
        terms = self.input_grad_terms(layer, parts, x, values)
        if terms is None:
            return None
        return self.input_grad_from(layer, [(kind, heads) for kind, heads, _ in parts], *terms).to(x.dtype)

    def input_grad_terms(self, layer: int, parts: list[tuple[str, list[int], Tensor]], x: Tensor,
                         values: list[Tensor] | None = None) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
        """`input_grad` before it is carried to d_model: (g / s [batch, pos, n, d_head], xhat [1,
        batch, pos, d_model], along [1, batch, pos, n]), the last two None where no norm comes first.

        With xhat = the normalized stream and s its scale, the norm is y = w * xhat (+ b); its
        Jacobian's transpose takes v = w * u to (v - xhat * mean(v * xhat)) / s for an RMSNorm, and a
        LayerNorm also takes v's mean away. With u = W_i g (W_i the head's slice), w and the centring
        fold into W_i, so each head costs one product and one rank-one correction, xhat * along, and
        the norm's statistics are computed once for all heads. along needs xhat's projection through
        the folded slice, which is the head's q, k or v less what the norm's bias and the projection's
        bias add (`_offset`): given `values` (the q, k, v the forward computed, [batch, pos, n_kind,
        d_head] per part), it is read from them instead of computed. Terms are linear in what
        `input_grad_from` makes of them: the terms of several points (EAP-IG's steps) can be summed
        (g / s) and stacked (xhat, along) and carried to d_model once."""
        if any(self.projection(layer, kind)[2] is not None for kind, _, _ in parts):
            return None
        a = self.model.adapter
        grad = torch.cat([g for _, _, g in parts], 2)  # [batch, pos, n, d_head]
        wide = torch.promote_types(x.dtype, torch.float32)  # (the norms compute their statistics at least so)
        if a.attn_norm is None:  # no norm (OLMo-2): the projection alone
            return grad.to(wide), None, None
        centred = a.norm_kind.startswith("layernorm")
        norm = a.module(a.attn_norm, layer)
        stream = x.to(wide)
        if centred:
            stream = stream - stream.mean(-1, keepdim=True)
        scale = norm_scale(a.norm_kind, norm, x).to(wide)  # [batch, pos, 1]
        xhat = stream / scale  # [batch, pos, d_model]
        g = grad.to(wide) / scale[..., None]  # [batch, pos, n, d_head]
        if values is None:
            folded = torch.cat([self._fold(layer, kind, wide, centred)[heads] for kind, heads, _ in parts])  # [n, d_model, d_head]
            projected = torch.einsum("bpd,nde->bpne", xhat, folded)  # [batch, pos, n, d_head]
        else:  # xhat's projection is what the forward computed, less the biases
            projected = torch.cat([v.to(wide) - self._offset(layer, kind, wide)[heads]
                                   for (kind, heads, _), v in zip(parts, values)], 2)  # [batch, pos, n, d_head]
        along = (g * projected).sum(-1) / x.shape[-1]  # [batch, pos, n]
        return g, xhat[None], along[None]

    def input_grad_from(self, layer: int, parts: list[tuple[str, list[int]]], g: Tensor, xhat: Tensor | None,
                        along: Tensor | None) -> Tensor:
        """`input_grad_terms`' terms carried to d_model: g [batch, pos, n, d_head], xhat [t, batch,
        pos, d_model], along [t, batch, pos, n] (t points) -> [n, batch, pos, d_model] (at least float32)."""
        a = self.model.adapter
        if xhat is None:
            weight = torch.cat([self.projection(layer, kind)[0][heads] for kind, heads in parts])  # [n, d_model, d_head]
            return torch.einsum("bpne,nde->nbpd", g, weight.to(g.dtype))
        centred = a.norm_kind.startswith("layernorm")
        folded = torch.cat([self._fold(layer, kind, g.dtype, centred)[heads] for kind, heads in parts])  # [n, d_model, d_head]
        out = torch.einsum("bpne,nde->nbpd", g, folded)  # [n, batch, pos, d_model]
        if len(xhat) == 1:  # in place, no [n, batch, pos, d_model] temporary
            return out.addcmul_(xhat, along[0].permute(2, 0, 1)[..., None], value=-1)
        return out.sub_(torch.einsum("tbpn,tbpd->nbpd", along, xhat))

    def _offset(self, layer: int, kind: str, dtype: torch.dtype) -> Tensor:
        """What every head's q, k or v is when the norm's input is zero: the norm's bias through the
        head's slice plus the projection's bias, [head, d_head]."""
        key = (layer, kind, dtype)
        if key not in self._offsets:
            weight, bias, _ = self.projection(layer, kind)
            zero = torch.zeros(self.model.cfg.d_model, dtype=self.model.dtype, device=weight.device)
            normed = self._norms[layer](zero).to(dtype)  # [d_model]: the norm's bias (zero for an RMSNorm)
            self._offsets[key] = torch.einsum("d,hde->he", normed, weight.to(dtype)) + bias.to(dtype)
        return self._offsets[key]

    def _fold(self, layer: int, kind: str, dtype: torch.dtype, centred: bool) -> Tensor:
        """Every head's slice with the norm's gain folded in (and centred over d_model for a
        LayerNorm): [head, d_model, d_head]."""
        key = (layer, kind)
        if key not in self._folded:
            a = self.model.adapter
            weight = self.projection(layer, kind)[0].to(dtype)  # [head, d_model, d_head]
            gain = norm_weight(a.norm_kind, a.module(a.attn_norm, layer)).to(weight.device, dtype)  # [d_model]
            folded = weight * gain[:, None]
            self._folded[key] = folded - folded.mean(1, keepdim=True) if centred else folded
        return self._folded[key]


def _whole_norm(normed: Tensor, weight: Tensor, bias: Tensor, post: nn.Module) -> Tensor:
    """Every head's projection of normed [..., d_model] through a q/k norm over all heads (OLMo-2,
    OLMoE): [..., head, d_head]."""
    every = torch.einsum("...d,hde->...he", normed, weight) + bias  # [..., head, d_head]
    return post.forward(every.flatten(-2)).unflatten(-1, bias.shape)
