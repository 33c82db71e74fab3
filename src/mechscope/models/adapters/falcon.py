"""Falcon with rotary positions and parallel attention and MLP: Falcon-7B (multi-query: one
key/value head, one norm read by both) and the new decoder architecture of Falcon-40B, 180B and 2
(grouped key/value heads; a norm each for attention and the MLP, or one). Attention and rotary are
written inline in its forward (pattern and scores from its softmax, rotated q/k from its
apply_rotary_pos_emb); ALiBi Falcon (Falcon-RW) is refused.

The fused q|k|v projection is laid out per variant: [q heads, k, v] for multi-query, [per key/value
head: its query heads, k, v] for the new architecture, [per head: q, k, v] otherwise.

- Attention is written inline in its module's forward: `hook_pattern` and `hook_attn_scores` are its
  one softmax's output and input, read on the eager path (taken while they are hooked; the model
  otherwise runs its SDPA branch). `hook_rot_q|k` are what its `apply_rotary_pos_emb` returns, caught
  while that one module runs (on either branch); `hook_q|k` are before rotary.
- The MLP's output is added to in place (by attention's) before the residual add: `hook_mlp_out` is
  read as a copy, so what a hook or cache holds is the MLP's own output.
- ALiBi Falcon and the sequential layout (Falcon-RW) are refused: the family tests do not cover them.
"""

from dataclasses import replace

from mechscope.errors import UnsupportedModelError
from mechscope.models.adapters.base import Adapter, ModelConfig, Place
from mechscope.models.lens import FIRST, Lens, chunk, heads, span

# The module's output as a copy, and a written value given back as one: the model's in-place change
# after the hook reaches neither what the hook saw nor what it wrote (nor cuts a backward hook off).
COPIED = Lens(get=lambda v: v.clone(), put=lambda v, a: a.clone())
# [..., n, m * d] <-> [..., n * m, d]: a group's heads among all heads.
MERGED = Lens(get=lambda v: v.flatten(-2), put=lambda v, a: a.reshape(v.shape))


class FalconAdapter(Adapter):
    family = "falcon"
    model_types = ("falcon",)
    norm_kind = "layernorm"
    attn_inline = "eager"

    embed = "transformer.word_embeddings"
    layers = "transformer.h"
    final_norm = "transformer.ln_f"

    attn = "self_attention"
    out_proj = "self_attention.dense"
    down_proj = "mlp.dense_4h_to_h"
    attn_out = Place("self_attention", FIRST)
    mlp_out = Place("mlp", COPIED)
    mlp_pre = Place("mlp.dense_h_to_4h")

    def check(self) -> None:
        c = self.hf.config
        if c.alibi or not c.parallel_attn:
            raise UnsupportedModelError("Falcon with ALiBi or with attention and MLP in sequence (Falcon-RW) is not "
                                        "supported yet: the family tests cover rotary Falcon with parallel attention")

    @property
    def _two_norms(self) -> bool:
        c = self.hf.config
        return bool(c.new_decoder_architecture and c.num_ln_in_parallel_attn == 2)

    @property
    def attn_norm(self) -> str:
        return "ln_attn" if self._two_norms else "input_layernorm"

    @property
    def mlp_norm(self) -> str:
        return "ln_mlp" if self._two_norms else "input_layernorm"

    def parallel_residual(self) -> bool:
        return True

    def _config(self) -> ModelConfig:
        c = self.hf.config
        kv = c.num_kv_heads if c.new_decoder_architecture else 1 if c.multi_query else c.num_attention_heads
        return replace(super()._config(), n_kv_heads=kv, d_mlp=c.ffn_hidden_size)

    def qkv(self) -> dict[str, Place]:
        c, d, n = self.hf.config, self.cfg.d_head, self.cfg.n_heads
        fused = "self_attention.query_key_value"
        if c.new_decoder_architecture:  # per key/value head: its g query heads, then k, then v
            g = n // self.cfg.n_kv_heads
            group = heads((g + 2) * d)
            return {"q": Place(fused, group >> span(0, g * d) >> MERGED >> heads(d)),
                    "k": Place(fused, group >> span(g * d, (g + 1) * d)),
                    "v": Place(fused, group >> span((g + 1) * d, (g + 2) * d))}
        if c.multi_query:  # all query heads, then the one k, then the one v
            return {"q": Place(fused, span(0, n * d) >> heads(d)), "k": Place(fused, span(n * d, (n + 1) * d) >> heads(d)),
                    "v": Place(fused, span((n + 1) * d, (n + 2) * d) >> heads(d))}
        return {name: Place(fused, heads(3 * d) >> chunk(i, 3)) for i, name in enumerate("qkv")}  # per head: q, k, v
