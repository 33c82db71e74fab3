"""BLOOM: ALiBi instead of positions (nothing to rotate: no hook_rot_q|k), a LayerNorm on the
embeddings, one fused q|k|v projection interleaved per head, and attention written inline in its
module's forward.

- `hook_embed` is what enters the residual stream: the output of the embedding LayerNorm (`W_E` is
  the embedding matrix before it).
- `hook_pattern` and `hook_attn_scores` are the output and input of the one softmax in attention's
  forward (`attn_inline`): the scores include ALiBi's bias and the mask, and the pattern is computed
  in float32 and cast to the model's dtype, as the model does.
- Attention and the MLP add the residual inside their own forwards; `hook_attn_out` and
  `hook_mlp_out` are their output projections, which is what they add.
"""

from mechscope.errors import UnsupportedModelError
from mechscope.models.adapters.base import Adapter, Place
from mechscope.models.lens import OUT, chunk, heads


class BloomAdapter(Adapter):
    family = "bloom"
    model_types = ("bloom",)
    norm_kind = "layernorm"
    rotary = False  # ALiBi
    attn_inline = "always"
    per_head_arguments = ("alibi",)  # [batch * head, 1, key]

    embed = "transformer.word_embeddings"
    embed_site = "transformer.word_embeddings_layernorm"
    layers = "transformer.h"
    final_norm = "transformer.ln_f"

    attn = "self_attention"
    out_proj = "self_attention.dense"
    attn_norm = "input_layernorm"
    mlp_norm = "post_attention_layernorm"
    down_proj = "mlp.dense_4h_to_h"
    attn_out = Place("self_attention.dense", OUT)
    mlp_out = Place("mlp.dense_4h_to_h", OUT)
    mlp_pre = Place("mlp.dense_h_to_4h")

    def check(self) -> None:
        c = self.hf.config
        if c.apply_residual_connection_post_layernorm:
            raise UnsupportedModelError("BLOOM with apply_residual_connection_post_layernorm is not supported yet: "
                                        "its residual stream is a norm's output")
        if c.pretraining_tp > 1 and c.slow_but_exact:
            raise UnsupportedModelError("BLOOM with slow_but_exact and pretraining_tp > 1 is not supported: its "
                                        "output projections bypass their modules (set slow_but_exact=False)")

    def qkv(self) -> dict[str, Place]:  # per head: q, k, v side by side
        d = self.cfg.d_head
        return {name: Place("self_attention.query_key_value", heads(3 * d) >> chunk(i, 3)) for i, name in enumerate("qkv")}
