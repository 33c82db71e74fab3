"""GPT-2: fused q/k/v projection (Conv1D), learned positions, LayerNorm; and GPT-BigCode and GPT-Neo,
laid out like it."""

from dataclasses import replace

from mechscope.errors import UnsupportedModelError
from mechscope.models.adapters.base import Adapter, ModelConfig, Place
from mechscope.models.lens import FIRST, OUT, chunk, heads, span


class GPT2Adapter(Adapter):
    """GPT-2: fused q/k/v projection (Conv1D), learned positions, LayerNorm."""

    family = "gpt2"
    model_types = ("gpt2",)
    norm_kind = "layernorm"
    rotary = False  # learned positions: no hook_rot_q|k

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
    mlp_pre = Place("mlp.c_fc")

    def qkv(self) -> dict[str, Place]:
        d = self.cfg.d_head
        return {name: Place("attn.c_attn", chunk(i, 3) >> heads(d)) for i, name in enumerate("qkv")}


class GPTBigCodeAdapter(GPT2Adapter):
    """GPT-BigCode (StarCoder 1, SantaCoder): GPT-2's layout with Linear layers and, with multi-query
    attention, one key/value head: c_attn holds q (all heads), then k, then v."""

    family = "gpt_bigcode"
    model_types = ("gpt_bigcode",)

    def _config(self) -> ModelConfig:
        cfg = super()._config()
        return replace(cfg, n_kv_heads=1 if self.hf.config.multi_query else cfg.n_heads)

    def qkv(self) -> dict[str, Place]:
        d = self.cfg.d_head
        if not self.hf.config.multi_query:  # per head: q, k, v side by side
            return {name: Place("attn.c_attn", heads(3 * d) >> chunk(i, 3)) for i, name in enumerate("qkv")}
        q = self.cfg.n_heads * d
        return {"q": Place("attn.c_attn", span(0, q) >> heads(d)), "k": Place("attn.c_attn", span(q, q + d) >> heads(d)),
                "v": Place("attn.c_attn", span(q + d, q + 2 * d) >> heads(d))}



class GPTNeoAdapter(GPT2Adapter):
    """GPT-Neo (and TinyStories): GPT-2's layout with separate q/k/v projections, no attention scaling,
    and local (sliding-window) layers; its attention is a method of its own (`_attn`), which runs the
    pattern and score hooks while they are attached."""

    family = "gpt_neo"
    model_types = ("gpt_neo",)
    attn = "attn.attention"
    out_proj = "attn.attention.out_proj"
    attn_method = "_attn"
    # Its local window is a buffer aligned to the last query; rows that start at different positions
    # would see the wrong keys, so patched runs start at the patched layer only.
    resumes_at_a_position = False

    def check(self) -> None:
        kinds = {type(self.module(self.attn, l)).__name__ for l in range(len(self.layer_modules()))}
        if kinds != {"GPTNeoSelfAttention"}:
            raise UnsupportedModelError(f"GPT-Neo with {sorted(kinds)} attention is not supported: load it with "
                                        "attn_implementation='eager' (the flash kernel never forms the pattern)")

    def qkv(self) -> dict[str, Place]:
        return {name: Place(f"attn.attention.{name}_proj", heads(self.cfg.d_head)) for name in "qkv"}
