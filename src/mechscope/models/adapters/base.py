"""The adapter protocol: what mechscope needs to know about one model family's module layout.

An adapter never runs the model. It names the Hugging Face modules where each TransformerLens hook
site lives and the lens that reads the activation there (see `models/lens.py`); everything else
(hooking, caching, patching) is generic. To support a new family, copy `llama.py`, change the
paths, and register it in `adapters/__init__.py`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mechscope.models.lens import IN, OUT, Lens


def param(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """`module.<name>` (None if it has none), read back from accelerate's CPU or disk offload when the
    model keeps it on the meta device between forwards (load_model(..., device="auto", max_memory=...))."""
    value = getattr(module, name, None)
    if value is None or value.device.type != "meta":
        return value
    with onloaded(module):
        return getattr(module, name)  # the tensor read stays valid after the block


@contextmanager
def onloaded(module: nn.Module):
    """A block in which an offloaded module's weights are real tensors (loaded from accelerate's
    offload, then back to meta); nothing to do for a module whose weights are in memory."""
    if not any(p.device.type == "meta" for p in module.parameters()):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the wrapped model, in TransformerLens vocabulary."""

    model_name: str
    architecture: str  # the Hugging Face class, e.g. "LlamaForCausalLM"
    family: str  # the adapter that wraps it: "gpt2", "neox", "llama", "gemma3"
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads for grouped-query attention
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    parallel_residual: bool  # attention and MLP both read resid_pre (GPT-NeoX); no resid_mid then


@dataclass(frozen=True)
class Place:
    """A module (path relative to one decoder layer, or to the whole model) and a lens into it."""

    path: str
    lens: Lens = OUT
    on_input: bool = False


def at_input(path: str, lens: Lens | None = None) -> Place:
    return Place(path, IN if lens is None else IN >> lens, on_input=True)


class Adapter:
    """Module layout of one family. Subclasses set the class attributes and `qkv`."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # Hugging Face `config.model_type` values
    norm_kind: ClassVar[str]  # "layernorm" | "layernorm32" (in float32, no bias: Cohere, OLMo) | "rmsnorm" |
    # "rmsnorm_plus_one" (Gemma's (1 + w))

    # Paths relative to the Hugging Face model.
    embed: ClassVar[str]
    embed_lens: ClassVar[Lens] = OUT  # the embedding module's output -> what enters the residual stream
    embed_site: ClassVar[str | None] = None  # where hook_embed is read, if not at `embed` (Bloom's embedding norm)
    pos_embed: ClassVar[str | None] = None
    layers: ClassVar[str]
    final_norm: ClassVar[str]
    # Paths relative to one decoder layer.
    attn: ClassVar[str]
    out_proj: ClassVar[str]  # attention output projection; its input is hook_z
    down_proj: ClassVar[str]  # MLP output projection; its input is mlp.hook_post
    attn_norm: ClassVar[str | None]  # the norm before attention; its input is resid_pre (None: OLMo-2 has none)
    mlp_norm: ClassVar[str | None]  # the norm before the MLP; its input is resid_mid (None: OLMo-2 has none)
    mlp_block: ClassVar[str] = "mlp"  # the MLP module: what reads resid_mid where no norm comes before it
    attn_post_norm: ClassVar[str | None] = None  # Gemma's norm between attention and the add
    mlp_post_norm: ClassVar[str | None] = None  # Gemma's norm between the MLP and the add
    attn_out: ClassVar[Place]  # what attention adds to the residual stream
    mlp_out: ClassVar[Place]  # what the MLP adds to the residual stream
    mlp_pre: ClassVar[Place | None] = None  # the MLP's pre-activation (the gate, for gated MLPs)
    mlp_pre_linear: ClassVar[Place | None] = None  # a gated MLP's linear half (its up projection)
    rotary: ClassVar[bool] = True  # q and k rotated inside attention: hook_rot_q|k
    attn_method: ClassVar[str | None] = None  # attention as a method of `attn` (GPT-Neo's _attn), not pluggable
    # Attention written inline in `attn`'s forward (Bloom, Falcon): pattern and scores are its softmax's
    # output and input (attention.InlineSwitch); "eager" where only the eager path forms them (Falcon).
    attn_inline: ClassVar[str | None] = None
    # Layer arguments laid out [batch * head, ...] (Bloom's alibi): tiled per prompt when variants run.
    per_head_arguments: ClassVar[tuple[str, ...]] = ()
    # Whether a patched run may start at a position over recorded keys and values (patching/resume.py):
    # not where the attention masks itself by a buffer aligned to the last query (GPT-Neo's windows).
    resumes_at_a_position: ClassVar[bool] = True
    # Whether the q/k norms after the projections (qkv_projections' second entry) normalize all heads
    # together (OLMo-2, OLMoE), not each head alone (Gemma 3, Qwen3): then a head's q depends on every
    # head's projection of its input.
    qk_norm_whole: ClassVar[bool] = False
    # Whether the MLP and the norm before it see the stream flattened to [batch * pos, d_model] (OPT):
    # their sites are shown as [batch, pos, ...] all the same (sites.FlatSite).
    mlp_flat: ClassVar[bool] = False
    moe_block: ClassVar[str | None] = None  # mixture of experts: the block (the MLP node) ...
    router: ClassVar[str | None] = None  # ... and its router, on layers that have one

    def __init__(self, hf_model: nn.Module):
        self.hf = hf_model
        self.check()
        self.cfg = self._config()

    def check(self) -> None:
        """Raise UnsupportedModelError for options of the family that its tests do not prove."""

    # ---- per family -------------------------------------------------------------------------
    def qkv(self) -> dict[str, Place]:
        """Places of `q`, `k`, `v` as [batch, pos, head, d_head] (k, v per key/value head)."""
        raise NotImplementedError

    def qkv_projections(self) -> dict[str, tuple[Place, str | None]]:
        """For edge discovery and hook_q|k|v_input: where q, k, v are an affine function of the
        attention norm's output (the projection, read per head), and the module applied after it
        (the q/k norms: per head on Gemma 3, on all heads at once where `qk_norm_whole`), or None. By
        default the hook sites themselves."""
        return {name: (place, None) for name, place in self.qkv().items()}

    def parallel_residual(self) -> bool:
        return False

    def is_moe(self, layer: int) -> bool:
        """Whether this layer's MLP is a mixture of experts (some MoE models keep dense layers)."""
        if self.router is None:
            return False
        try:
            self.module(self.router, layer)
        except AttributeError:
            return False
        return True

    def n_experts(self) -> int:
        c = self.hf.config
        return getattr(c, "num_local_experts", None) or c.num_experts

    # ---- modules ----------------------------------------------------------------------------
    def module(self, path: str, layer: int | None = None) -> nn.Module:
        root = self.hf if layer is None else self.layer_modules()[layer]
        return root.get_submodule(path)

    def layer_modules(self) -> nn.ModuleList:
        return self.hf.get_submodule(self.layers)

    def reader(self, layer: int, mlp: bool = False) -> nn.Module:
        """The module whose input is the stream that attention (or the MLP) reads: the norm before it,
        or the sublayer itself where it has none (OLMo-2). Pre-hooks there see and replace that stream."""
        path = self.mlp_norm if mlp else self.attn_norm
        return self.module(path if path is not None else self.mlp_block if mlp else self.attn, layer)

    def pre_norm(self, layer: int, mlp: bool = False):
        """What happens to the stream before attention (or the MLP) reads it: the norm module's own
        forward (no hooks run), or nothing where the family has no norm there (OLMo-2)."""
        path = self.mlp_norm if mlp else self.attn_norm
        return _unchanged if path is None else self.module(path, layer).forward

    # ---- weights ----------------------------------------------------------------------------
    def W_O(self, layer: int) -> torch.Tensor:
        """Output projection per head, [head, d_head, d_model]."""
        proj = self.module(self.out_proj, layer)
        weight = param(proj) if _is_conv1d(proj) else param(proj).T  # [head * d_head, d_model]
        weight = weight.reshape(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model)
        return weight if self.residual_multiplier is None else weight * self.residual_multiplier

    def b_O(self, layer: int) -> torch.Tensor | None:
        bias = param(self.module(self.out_proj, layer), "bias")
        return bias if bias is None or self.residual_multiplier is None else bias * self.residual_multiplier

    @property
    def unembed(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    @property
    def residual_multiplier(self) -> float | None:
        """A factor on attention's and the MLP's outputs before the residual add (Granite's), or None:
        W_O, b_O and `mlp_out_affine` include it, so heads and neurons sum to what is added."""
        return None

    def mlp_out_affine(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_out [d_mlp, d_model], b_out [d_model]): what `mlp.hook_post` becomes in `hook_mlp_out`
        (before Gemma's post-MLP norm), read from the down projection."""
        from mechscope.models.weights import read_affine

        w, b = read_affine(self.module(self.down_proj, layer), OUT, self.cfg.d_mlp, what=f"layer {layer}'s MLP")
        m = self.residual_multiplier
        return (w, b) if m is None else (w * m, b * m)

    @property
    def logit_scale(self) -> float | None:
        """A factor the model multiplies its logits by after the unembedding (Cohere's), or None."""
        return None

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding, [d_model, d_vocab] (times the logit scale, where the model has one)."""
        w = param(self.unembed).T
        return w if self.logit_scale is None else w * self.logit_scale

    @property
    def b_U(self) -> torch.Tensor | None:
        b = param(self.unembed, "bias")
        return b if b is None or self.logit_scale is None else b * self.logit_scale

    # ---- per-head attention output in the residual stream -----------------------------------
    def head_results(
        self, layer: int, z: torch.Tensor, proj_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each head's write to the residual stream, [batch, pos, head, d_model].

        `z` is the output projection's input, [batch, pos, head * d_head] or [..., head, d_head].
        Without a post-attention norm, the heads plus `b_O` sum to `hook_attn_out`. With one
        (Gemma 3), each head's share is scaled by that norm's scale, computed from the summed
        projection `proj_out` (or from the heads' own sum when not given), so the heads alone sum
        to `hook_attn_out` (the norm is linear once its scale is fixed).
        """
        z = z.reshape(*z.shape[:2], self.cfg.n_heads, self.cfg.d_head)  # [batch, pos, head, d_head]
        result = torch.einsum("bphd,hdm->bphm", z, self.W_O(layer))  # [batch, pos, head, d_model]
        if self.attn_post_norm is None:
            return result
        total = result.sum(2) if proj_out is None else proj_out  # [batch, pos, d_model]
        return self.post_norm_share(self.attn_post_norm, layer, result, total)

    def post_norm_share(self, norm_path: str, layer: int, parts: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """Parts [..., part, d_model] of what a post-norm (Gemma's, between a sublayer and the add)
        normalizes, each passed through it with the scale of their `total` [..., d_model]: the norm
        is linear once its scale is fixed, so the shares sum to the norm's output."""
        norm = self.module(norm_path, layer)
        scale = norm_scale(self.norm_kind, norm, total)  # [..., 1]
        weight = norm_weight(self.norm_kind, norm)  # [d_model]
        wide = torch.promote_types(parts.dtype, torch.float32)  # a linear fold: as wide as the model
        return (parts.to(wide) / scale[..., None, :] * weight.to(wide)).to(parts.dtype)

    def attn_out_from_results(self, layer: int, result: torch.Tensor) -> torch.Tensor:
        """What attention adds to the residual stream given each head's result, [batch, pos, d_model]."""
        out = result.sum(2)
        bias = None if self.attn_post_norm is not None else self.b_O(layer)
        return out if bias is None else out + bias

    # ---- config -----------------------------------------------------------------------------
    def _config(self) -> ModelConfig:
        c = self.hf.config
        n_heads = c.num_attention_heads
        d_model = c.hidden_size
        d_mlp = (getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or getattr(c, "ffn_dim", None)
                 or 4 * d_model)
        return ModelConfig(
            model_name=getattr(c, "name_or_path", "") or type(self.hf).__name__,
            architecture=type(self.hf).__name__,
            family=self.family,
            n_layers=c.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
            d_head=getattr(c, "head_dim", None) or d_model // n_heads,
            d_model=d_model,
            d_mlp=d_mlp,
            d_vocab=self.unembed.weight.shape[0],
            n_ctx=getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 0),
            parallel_residual=self.parallel_residual(),
        )


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2 stores weights as [in, out]


# ---- norms: the math of each kind, for reading and writing `ln_final.hook_scale` ---------------
def _eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        if getattr(norm, name, None) is not None:
            return getattr(norm, name)
    return 1e-5  # OLMo's weightless LayerNorm passes F.layer_norm's default


def norm_scale(kind: str, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The divisor a norm applies, [batch, pos, 1] (TransformerLens's `hook_scale`)."""
    if kind == "layernorm":
        return (x.var(-1, keepdim=True, unbiased=False) + _eps(norm)).sqrt()
    if kind == "layernorm32":
        return (x.float().var(-1, keepdim=True, unbiased=False) + _eps(norm)).sqrt()
    return (x.float().pow(2).mean(-1, keepdim=True) + _eps(norm)).sqrt()


def norm_weight(kind: str, norm: nn.Module) -> torch.Tensor:
    """The multiplier a norm applies after dividing by its scale, [d_model] (ones for OLMo's, which
    has no weight)."""
    if getattr(norm, "weight", None) is None:
        return torch.ones(norm.normalized_shape, dtype=torch.float32)
    return 1.0 + param(norm).float() if kind == "rmsnorm_plus_one" else param(norm)


def norm_apply(kind: str, norm: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The norm's output with a given scale, written the way the family's module computes it."""
    if kind == "layernorm":
        return (x - x.mean(-1, keepdim=True)) / scale * param(norm) + param(norm, "bias")
    if kind == "layernorm32":
        wide = x.float()
        return ((wide - wide.mean(-1, keepdim=True)) / scale * norm_weight(kind, norm).float()).to(x.dtype)
    if kind == "rmsnorm":
        return param(norm) * (x.float() / scale).to(x.dtype)
    return (x.float() / scale * norm_weight(kind, norm)).to(x.dtype)
