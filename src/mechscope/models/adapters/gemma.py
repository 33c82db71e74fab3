"""Gemma 3 (text): Llama's module names, plus q/k norms, sliding-window layers, and sandwich norms
around attention and MLP.

`hook_attn_out` and `hook_mlp_out` are what is added to the residual stream, i.e. the outputs of the
post-attention and post-feedforward norms. `hook_q` and `hook_k` are read after the q/k norms and
before rotary. `hook_result` is each head's share of `hook_attn_out`: its output projection scaled
by the post-attention norm (whose scale is set by all heads together), so heads sum to
`hook_attn_out`. Sliding windows need nothing here: they live in the attention masks.
"""

from mechscope.models.adapters.base import Place
from mechscope.models.adapters.llama import LlamaAdapter
from mechscope.models.lens import OUT, TRANSPOSED, heads


class Gemma3Adapter(LlamaAdapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
    norm_kind = "rmsnorm_plus_one"  # x / rms * (1 + w); the embedding scales by sqrt(d_model) inside

    mlp_norm = "pre_feedforward_layernorm"
    attn_post_norm = "post_attention_layernorm"
    mlp_post_norm = "post_feedforward_layernorm"
    attn_out = Place("post_attention_layernorm", OUT)
    mlp_out = Place("post_feedforward_layernorm", OUT)

    def qkv(self) -> dict[str, Place]:
        # q_norm / k_norm run on [batch, head, pos, d_head]; v is read from its projection.
        return {
            "q": Place("self_attn.q_norm", TRANSPOSED),
            "k": Place("self_attn.k_norm", TRANSPOSED),
            "v": Place("self_attn.v_proj", heads(self.cfg.d_head)),
        }

    def qkv_projections(self) -> dict[str, tuple[Place, str | None]]:
        d = self.cfg.d_head
        return {"q": (Place("self_attn.q_proj", heads(d)), "self_attn.q_norm"),
                "k": (Place("self_attn.k_proj", heads(d)), "self_attn.k_norm"),
                "v": (Place("self_attn.v_proj", heads(d)), None)}


class Gemma2Adapter(Gemma3Adapter):
    """Gemma 2: Gemma 3's sandwich norms without q/k norms; attention logits soft-capped inside its
    eager attention (hook_pattern is read after the cap and the softmax) and final logits soft-capped
    (`logits_from_resid` applies the cap too). Direct logit attribution is before the final cap."""

    family = "gemma2"
    model_types = ("gemma2",)

    def qkv(self) -> dict[str, Place]:
        return LlamaAdapter.qkv(self)

    def qkv_projections(self) -> dict[str, tuple[Place, str | None]]:
        return {name: (place, None) for name, place in self.qkv().items()}
