"""Llama-like models (Llama, Mistral with its sliding windows, Qwen2 and Qwen2.5, SmolLM2): separate q/k/v, rotary,
RMSNorm, GQA."""

from mechscope.models.adapters.base import Adapter, Place
from mechscope.models.lens import FIRST, OUT, heads


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    norm_kind = "rmsnorm"

    embed = "model.embed_tokens"
    layers = "model.layers"
    final_norm = "model.norm"

    attn = "self_attn"
    out_proj = "self_attn.o_proj"
    attn_norm = "input_layernorm"
    down_proj = "mlp.down_proj"
    mlp_norm = "post_attention_layernorm"
    attn_out = Place("self_attn", FIRST)
    mlp_out = Place("mlp", OUT)
    mlp_pre = Place("mlp.gate_proj")
    mlp_pre_linear = Place("mlp.up_proj")

    def qkv(self) -> dict[str, Place]:
        d = self.cfg.d_head
        return {name: Place(f"self_attn.{name}_proj", heads(d)) for name in "qkv"}
