"""Families that are Llama with a difference or two: each entry names only what differs. Every
entry is proven by the family parity tests (tests/parity/test_families.py) on a tiny model of that
family's own config class; options those tests do not cover are refused (`check`)."""

from mechscope.errors import UnsupportedModelError
from mechscope.models.adapters.base import Place
from mechscope.models.adapters.gemma import Gemma3Adapter
from mechscope.models.adapters.llama import LlamaAdapter
from mechscope.models.lens import FIRST, OUT, heads, scaled, span


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: RMSNorm on each head's q and k (after the projection, before rotary)."""

    family = "qwen3"
    model_types = ("qwen3",)

    def qkv(self) -> dict[str, Place]:
        # q_norm / k_norm run on [batch, pos, head, d_head]; hook_q / hook_k are their outputs.
        return {"q": Place("self_attn.q_norm", OUT), "k": Place("self_attn.k_norm", OUT),
                "v": Place("self_attn.v_proj", heads(self.cfg.d_head))}

    qkv_projections = Gemma3Adapter.qkv_projections  # projections, then the per-head q/k norms


class GemmaAdapter(LlamaAdapter):
    """Gemma (1): RMSNorm as x / rms * (1 + w), embeddings scaled by sqrt(d_model) inside the module."""

    family = "gemma"
    model_types = ("gemma",)
    norm_kind = "rmsnorm_plus_one"


class Starcoder2Adapter(LlamaAdapter):
    """StarCoder2: LayerNorm, biases, a plain (ungated) MLP c_fc -> c_proj."""

    family = "starcoder2"
    model_types = ("starcoder2",)
    norm_kind = "layernorm"
    down_proj = "mlp.c_proj"
    mlp_pre = Place("mlp.c_fc")
    mlp_pre_linear = None


class StableLmAdapter(LlamaAdapter):
    """StableLM: LayerNorm, partial rotary (rotary lives inside attention: nothing to name)."""

    family = "stablelm"
    model_types = ("stablelm",)
    norm_kind = "layernorm"

    def check(self) -> None:
        c = self.hf.config
        if c.qk_layernorm or c.use_parallel_residual:
            raise UnsupportedModelError("StableLM with qk_layernorm or use_parallel_residual is not supported yet: "
                                        "the family tests cover the sequential model without q/k norms")


class Phi3Adapter(LlamaAdapter):
    """Phi-3: one fused q|k|v projection (q, then k, then v, each contiguous) and a fused gate|up."""

    family = "phi3"
    model_types = ("phi3",)

    @property
    def mlp_pre(self) -> Place:  # gate, then up, in one projection
        return Place("mlp.gate_up_proj", span(0, self.cfg.d_mlp))

    @property
    def mlp_pre_linear(self) -> Place:
        return Place("mlp.gate_up_proj", span(self.cfg.d_mlp, 2 * self.cfg.d_mlp))

    def qkv(self) -> dict[str, Place]:
        d, q, kv = self.cfg.d_head, self.cfg.n_heads * self.cfg.d_head, self.cfg.n_kv_heads * self.cfg.d_head
        bounds = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        return {name: Place("self_attn.qkv_proj", span(a, b) >> heads(d)) for name, (a, b) in bounds.items()}


class SmolLM3Adapter(LlamaAdapter):
    """SmolLM3: Llama's modules; some layers skip rotary (NoPE), which happens inside attention."""

    family = "smollm3"
    model_types = ("smollm3",)


class MixtralAdapter(LlamaAdapter):
    """Mixtral: Mistral with a mixture of experts for the MLP (experts fused inside the block):
    `mlp.hook_router` is the routing, [batch, pos, expert]; the block is the MLP node; no mlp.hook_post."""

    family = "mixtral"
    model_types = ("mixtral",)
    moe_block, router = "mlp", "mlp.gate"


class Qwen2MoeAdapter(MixtralAdapter):
    """Qwen2-MoE: routed experts plus an always-on gated shared expert, both inside the MLP node;
    layers listed in mlp_only_layers keep a dense MLP (with its own mlp.hook_pre/hook_post)."""

    family = "qwen2_moe"
    model_types = ("qwen2_moe",)


class Qwen3MoeAdapter(Qwen3Adapter):
    """Qwen3-MoE: Qwen3's per-head q/k norms and Mixtral's routed experts."""

    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    moe_block, router = "mlp", "mlp.gate"


class OlmoAdapter(LlamaAdapter):
    """OLMo (1): Llama's layout with LayerNorms that have no weight or bias and compute in float32."""

    family = "olmo"
    model_types = ("olmo",)
    norm_kind = "layernorm32"

    def check(self) -> None:
        if self.hf.config.clip_qkv is not None:
            raise UnsupportedModelError("OLMo with clip_qkv is not supported yet: it clamps q, k and v in place after "
                                        "the projections, after hook_q|k|v have read them")


class GraniteAdapter(LlamaAdapter):
    """Granite: Llama's layout with multipliers on the embeddings and on each attention and MLP output
    before the residual add, its own attention scale, and logits divided by `logits_scaling`. The
    sites show what enters the residual stream (multipliers applied); W_O, b_O and W_out include the
    residual multiplier and W_U the logit divisor, so heads, neurons and DLA add up."""

    family = "granite"
    model_types = ("granite",)

    @property
    def embed_lens(self):
        return scaled(self.hf.config.embedding_multiplier)

    @property
    def attn_out(self) -> Place:
        return Place("self_attn", FIRST >> scaled(self.hf.config.residual_multiplier))

    @property
    def mlp_out(self) -> Place:
        return Place("mlp", scaled(self.hf.config.residual_multiplier))

    @property
    def residual_multiplier(self) -> float | None:
        return float(self.hf.config.residual_multiplier)

    @property
    def logit_scale(self) -> float | None:
        return 1.0 / self.hf.config.logits_scaling


class OlmoeAdapter(MixtralAdapter):
    """OLMoE: Mixtral's routed experts with RMSNorms on q and k that span all heads at once (after the
    projections, before rotary): `hook_q|k` are those norms' outputs per head, and a head's q depends
    on every head's projection (`qk_norm_whole`: hook_q_input and edge readers pass each head's
    input through the whole norm)."""

    family = "olmoe"
    model_types = ("olmoe",)
    qk_norm_whole = True

    def check(self) -> None:
        if self.hf.config.clip_qkv is not None:
            raise UnsupportedModelError("OLMoE with clip_qkv is not supported yet: it clamps q, k and v in place "
                                        "after hook_q|k|v have read them")

    def qkv(self) -> dict[str, Place]:
        d = self.cfg.d_head
        return {"q": Place("self_attn.q_norm", heads(d)), "k": Place("self_attn.k_norm", heads(d)),
                "v": Place("self_attn.v_proj", heads(d))}

    def qkv_projections(self) -> dict[str, tuple[Place, str | None]]:
        d = self.cfg.d_head
        return {"q": (Place("self_attn.q_proj", heads(d)), "self_attn.q_norm"),
                "k": (Place("self_attn.k_proj", heads(d)), "self_attn.k_norm"),
                "v": (Place("self_attn.v_proj", heads(d)), None)}


class Olmo2Adapter(Gemma3Adapter):
    """OLMo-2: no norm before attention or the MLP (each reads the residual stream itself, so there is
    no ln1/ln2.hook_scale), RMSNorms after them as Gemma 3's post-norms (`hook_attn_out|mlp_out` are
    their outputs, heads share the post-norm's scale), and q/k norms over all heads as OLMoE's."""

    family = "olmo2"
    model_types = ("olmo2",)
    norm_kind = "rmsnorm"
    attn_norm = None
    mlp_norm = None
    qk_norm_whole = True
    qkv = OlmoeAdapter.qkv
    qkv_projections = OlmoeAdapter.qkv_projections


class GptOssAdapter(MixtralAdapter):
    """GPT-OSS: Mixtral's layout with biases, a learned attention sink per head, and a clamped SwiGLU
    in its experts. The sink takes a share of each query's softmax: `hook_pattern` rows sum to less
    than 1 (the rest went to the sink), and `hook_attn_scores` has one more key, the sink's logit,
    last (each row shifted by its maximum, as its eager attention computes them)."""

    family = "gpt_oss"
    model_types = ("gpt_oss",)
    router = "mlp.router"
    mlp_out = Place("mlp", FIRST)  # the block returns (output, router scores)


VARIANTS = (Qwen3Adapter, GemmaAdapter, Starcoder2Adapter, StableLmAdapter, Phi3Adapter, SmolLM3Adapter,
            MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoAdapter, GraniteAdapter,
            GptOssAdapter, OlmoeAdapter, Olmo2Adapter)
