"""GPT-NeoX (Pythia): fused q/k/v interleaved per head, rotary, LayerNorm, parallel residual."""

from mechscope.models.adapters.base import Adapter, Place
from mechscope.models.lens import OUT, chunk, heads


class NeoXAdapter(Adapter):
    family = "neox"
    model_types = ("gpt_neox",)
    norm_kind = "layernorm"

    embed = "gpt_neox.embed_in"
    layers = "gpt_neox.layers"
    final_norm = "gpt_neox.final_layer_norm"

    attn = "attention"
    out_proj = "attention.dense"
    attn_norm = "input_layernorm"
    down_proj = "mlp.dense_4h_to_h"
    mlp_norm = "post_attention_layernorm"
    attn_out = Place("post_attention_dropout", OUT)
    mlp_out = Place("post_mlp_dropout", OUT)
    mlp_pre = Place("mlp.dense_h_to_4h")

    def parallel_residual(self) -> bool:
        return bool(self.hf.config.use_parallel_residual)

    def qkv(self) -> dict[str, Place]:
        # query_key_value's output is [batch, pos, head * 3 * d_head]: each head holds its q, k, v.
        d = self.cfg.d_head
        return {
            name: Place("attention.query_key_value", heads(3 * d) >> chunk(i, 3))
            for i, name in enumerate("qkv")
        }
