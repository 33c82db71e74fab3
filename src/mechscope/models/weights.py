"""The model's weights in TransformerLens's layout, for reading circuits from the weights ("A
Mathematical Framework", the IOI paper's copy scores): `model.weights`.

1. W_Q, W_K, W_V [layer, head, d_model, d_head] and b_Q, b_K, b_V [layer, head, d_head]: each read
   from the projection module itself (its value on the zero vector is the bias, on the unit vectors
   the weight), so every layout (separate, fused, interleaved per head) reads the same way through
   the adapter's lens. Keys and values are per key/value head, or per query head with
   `per_query_head=True` (each query head's own key/value head, as TransformerLens gives them).
   They act on the attention norm's output; `fold_norm=True` folds the norm's weight (and bias) in,
   so they act on the normalised stream (x - mean) / scale (or x / rms). On Qwen3 and Gemma 3, q and
   k pass a per-head norm after W_Q and W_K, which no matrix can hold.
2. W_O [layer, head, d_head, d_model], b_O [layer, d_model] (zeros where there is none).
3. W_E [d_vocab, d_model], W_pos [n_ctx, d_model] (learned positions only), W_U, b_U.
4. W_in [layer, d_model, d_mlp] (the pre-activation: the gate of a gated MLP), W_gate_linear (its up
   projection), W_out [layer, d_mlp, d_model]; not on mixture-of-experts layers.
5. OV = W_V W_O and QK = W_Q W_K^T per head, as `FactoredMatrix` (d_model x d_model, never formed
   unless asked), and the composition scores of Elhage et al. 2021 between heads.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

from mechscope.errors import InputError, UnsupportedModelError
from mechscope.models.adapters.base import norm_weight, onloaded, param


def read_affine(module, lens, d_in: int, *, what: str) -> tuple[Tensor, Tensor]:
    """(weight [d_in, *out], bias [*out]) of an affine module read through a lens: its value on the
    zero vector is the bias, on the unit vectors the weight (any layout: separate, fused, interleaved).
    Checked against the module on a random input; a module that is not affine is refused."""
    with torch.no_grad(), onloaded(module):  # offloaded weights: loaded for the block
        p = next(module.parameters())
        basis = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)]).to(p)  # [1 + d_in, d_in]
        out = lens.get(module.forward(basis))  # [1 + d_in, *out] (forward: no hooks)
        bias, weight = out[0], out[1:] - out[0]
        probe = torch.randn(3, d_in, generator=torch.Generator().manual_seed(0)).to(p)
        direct = lens.get(module.forward(probe))  # [3, *out]
        mine = torch.tensordot(probe, weight, dims=1) + bias
    if not torch.allclose(mine, direct, rtol=1e-3, atol=1e-4 * (1 + direct.abs().max().item())):
        raise UnsupportedModelError(f"{type(module).__name__} ({what}) is not an affine map of its input, so its "
                                    "weights cannot be read")
    return weight, bias


@dataclass(frozen=True)
class FactoredMatrix:
    """A @ B kept as its factors: A [..., m, r], B [..., r, n] (r small: d_head)."""

    A: Tensor
    B: Tensor

    @property
    def AB(self) -> Tensor:
        """The product, [..., m, n]."""
        return self.A @ self.B

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def __matmul__(self, x: Tensor) -> Tensor:
        """(A @ B) @ x, through the factors: x [..., n] or [..., n, k]."""
        return self.A @ (self.B @ x) if x.ndim > 1 else (self.A @ (self.B @ x[:, None]))[..., 0]

    def norm(self) -> Tensor:
        """Frobenius norm [...]: sqrt(trace(A^T A B B^T)), from r x r products."""
        ata = self.A.transpose(-1, -2) @ self.A  # [..., r, r]
        bbt = self.B @ self.B.transpose(-1, -2)  # [..., r, r]
        return (ata * bbt).sum((-1, -2)).clamp_min(0).sqrt()

    def singular_values(self) -> Tensor:
        """[..., r]: from the r x r core of the two thin QR factors."""
        qa, ra = torch.linalg.qr(self.A)
        qb, rb = torch.linalg.qr(self.B.transpose(-1, -2))
        return torch.linalg.svdvals(ra @ rb.transpose(-1, -2))


class Weights:
    """The weights of one HookedModel (see the module docstring), read from its modules on each call
    (so they follow any change to the model); editing them does not change the model."""

    def __init__(self, model):
        self.model = model
        self.adapter = model.adapter
        self.cfg = model.cfg

    # ---- attention -----------------------------------------------------------------------------
    def _projection(self, kind: str) -> tuple[Tensor, Tensor]:
        a = self.adapter
        place, _ = a.qkv_projections()[kind]
        w, b = zip(*[read_affine(a.module(place.path, l), place.lens, self.cfg.d_model, what=f"layer {l}'s {kind}")
                     for l in range(self.cfg.n_layers)])  # [d_model, head, d_head], [head, d_head] each
        return torch.stack(w).permute(0, 2, 1, 3), torch.stack(b)  # [layer, head, d_model, d_head], [layer, head, d_head]

    def attention(self, kind: str, *, per_query_head: bool = False, fold_norm: bool = False) -> tuple[Tensor, Tensor]:
        """(W [layer, head, d_model, d_head], b [layer, head, d_head]) of "q", "k" or "v"."""
        if kind not in ("q", "k", "v"):
            raise InputError(f"kind is 'q', 'k' or 'v', not {kind!r}")
        w, b = self._projection(kind)  # read afresh: the model's weights may have changed
        if per_query_head and kind != "q":
            group = self.cfg.n_heads // self.cfg.n_kv_heads
            w, b = w.repeat_interleave(group, dim=1), b.repeat_interleave(group, dim=1)
        if fold_norm:
            w, b = self._fold(w, b)
        return w, b

    def _fold(self, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Fold each layer's attention norm (x -> n(x) * g + beta) into what reads it."""
        a = self.adapter
        gains, shifts = [], []
        for l in range(self.cfg.n_layers):
            if a.attn_norm is None:  # OLMo-2: attention reads the stream itself
                gains.append(torch.ones(self.cfg.d_model).to(w))
                shifts.append(torch.zeros_like(gains[-1]))
                continue
            norm = a.module(a.attn_norm, l)
            gains.append(norm_weight(a.norm_kind, norm).detach().to(w))
            beta = param(norm, "bias")
            shifts.append(torch.zeros_like(gains[-1]) if beta is None else beta.detach().to(w))
        g, beta = torch.stack(gains), torch.stack(shifts)  # [layer, d_model]
        return w * g[:, None, :, None], b + torch.einsum("ld,lhde->lhe", beta, w)

    @property
    def W_O(self) -> Tensor:
        """[layer, head, d_head, d_model]."""
        return torch.stack([self.adapter.W_O(l) for l in range(self.cfg.n_layers)]).detach()

    @property
    def b_O(self) -> Tensor:
        """[layer, d_model]."""
        like = self.adapter.W_O(0)  # dtype and device for the layers without a bias
        out = [self.adapter.b_O(l) for l in range(self.cfg.n_layers)]
        return torch.stack([like.new_zeros(self.cfg.d_model) if b is None else b.detach() for b in out])

    def OV(self, *, fold_norm: bool = False) -> FactoredMatrix:
        """[layer, head]: d_model (the normalised stream a head reads) -> d_model (what it writes, before
        a post-attention norm where the family has one)."""
        w_v, _ = self.attention("v", per_query_head=True, fold_norm=fold_norm)
        return FactoredMatrix(w_v, self.W_O)

    def QK(self, *, fold_norm: bool = False) -> FactoredMatrix:
        """[layer, head]: query-side d_model x key-side d_model (bilinear form of the attention scores,
        before scaling, rotary and any q/k norm)."""
        w_q, _ = self.attention("q", fold_norm=fold_norm)
        w_k, _ = self.attention("k", per_query_head=True, fold_norm=fold_norm)
        return FactoredMatrix(w_q, w_k.transpose(-1, -2))

    def composition_scores(self, kind: str, *, fold_norm: bool = True) -> Tensor:
        """[layer, head, layer, head]: how much the earlier head's OV output feeds the later head's
        `kind` input ("q", "k" or "v"): ||M_out M_in||_F / (||M_out||_F ||M_in||_F) (Elhage et al. 2021);
        0 where the later head is not later."""
        if kind not in ("q", "k", "v"):
            raise InputError(f"kind is 'q', 'k' or 'v', not {kind!r}")
        ov, qk = self.OV(fold_norm=fold_norm), self.QK(fold_norm=fold_norm)
        reader = {"q": qk, "k": qk.T, "v": ov}[kind]  # d_model -> ..., read from the residual stream
        L, H = self.cfg.n_layers, self.cfg.n_heads
        out = torch.zeros(L, H, L, H, dtype=ov.A.dtype)
        for l1 in range(L - 1):
            for l2 in range(l1 + 1, L):
                # (OV_1 as [m, n]) then the reader of head 2 on the stream: OV_1 @ reader_2, per pair of heads
                a1, b1 = ov.A[l1][:, None], ov.B[l1][:, None]  # [H, 1, d_model, d_head], [H, 1, d_head, d_model]
                a2, b2 = reader.A[l2][None], reader.B[l2][None]  # [1, H, d_model, r], [1, H, r, n]
                core = FactoredMatrix(a1, (b1 @ a2) @ b2)  # [H, H]: d_model x n, rank <= d_head
                out[l1, :, l2] = (core.norm() / (ov.norm()[l1][:, None] * reader.norm()[l2][None])).to(out)
        return out

    # ---- embeddings and MLP --------------------------------------------------------------------
    @property
    def W_E(self) -> Tensor:
        """[d_vocab, d_model] (without Gemma's sqrt(d_model) scale, which the embedding module applies,
        nor Granite's embedding multiplier)."""
        return param(self.adapter.module(self.adapter.embed)).detach()

    @property
    def W_pos(self) -> Tensor:
        if self.adapter.pos_embed is None:
            raise UnsupportedModelError(f"{self.cfg.family} has no learned positions (rotary or none): no W_pos")
        return param(self.adapter.module(self.adapter.pos_embed)).detach()

    def _mlp_layers(self) -> list[int]:
        moe = [l for l in range(self.cfg.n_layers) if self.adapter.is_moe(l)]
        if moe:
            raise UnsupportedModelError(f"layers {moe} are mixtures of experts: their experts are fused inside "
                                        "the block, so there is no single W_in / W_out")
        return list(range(self.cfg.n_layers))

    def _read(self, place, layer: int, d_in: int) -> Tensor:
        """[d_in, d_out] of an affine module of a layer, through its lens."""
        return read_affine(self.adapter.module(place.path, layer), place.lens, d_in, what=f"layer {layer}'s MLP")[0]

    @property
    def W_in(self) -> Tensor:
        """[layer, d_model, d_mlp]: the pre-activation (the gate, in a gated MLP)."""
        if self.adapter.mlp_pre is None:
            raise UnsupportedModelError(f"{self.cfg.family} names no MLP pre-activation")
        return torch.stack([self._read(self.adapter.mlp_pre, l, self.cfg.d_model) for l in self._mlp_layers()])

    @property
    def W_gate_linear(self) -> Tensor:
        """[layer, d_model, d_mlp]: a gated MLP's linear half (its up projection)."""
        if self.adapter.mlp_pre_linear is None:
            raise UnsupportedModelError(f"{self.cfg.family}'s MLP is not gated")
        return torch.stack([self._read(self.adapter.mlp_pre_linear, l, self.cfg.d_model) for l in self._mlp_layers()])

    @property
    def W_out(self) -> Tensor:
        """[layer, d_mlp, d_model]: the down projection (times Granite's residual multiplier)."""
        return torch.stack([self.adapter.mlp_out_affine(l)[0] for l in self._mlp_layers()])
