"""GPT-2: fused q/k/v projection (Conv1D), learned positions, LayerNorm."""

from mechscope.models.adapters.base import Adapter, Place
from mechscope.models.lens import FIRST, OUT, chunk, heads


class GPT2Adapter(Adapter):
    family = "gpt2"
    model_types = ("gpt2",)
    norm_kind = "layernorm"

    embed = "transformer.wte"
    pos_embed = "transformer.wpe"
    layers = "transformer.h"
    final_norm = "transformer.ln_f"

    attn = "attn"
    out_proj = "attn.c_proj"
    attn_norm = "ln_1"
    down_proj = "mlp.c_proj"
    mlp_norm = "ln_2"
    attn_out = Place("attn", FIRST)
    mlp_out = Place("mlp", OUT)

    def qkv(self) -> dict[str, Place]:
        d = self.cfg.d_head
        return {name: Place("attn.c_attn", chunk(i, 3) >> heads(d)) for i, name in enumerate("qkv")}
