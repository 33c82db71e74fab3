"""OPT (125m, 1.3b and up: LayerNorm before each sublayer): learned positions (offset by 2, counted
from the attention mask), separate q/k/v projections with biases, q scaled after its projection, and
an MLP that runs on the stream flattened to [batch * pos, d_model].

`mlp_flat`: the MLP's sites (`mlp.hook_pre|hook_post`, `hook_mlp_out`, `ln2.hook_scale`) are read
from flattened modules and shown as [batch, pos, ...], like every other family's; written tensors
are flattened back. `hook_q` is the projection's output, before the model's 1/sqrt(d_head) scaling."""

from mechscope.errors import UnsupportedModelError
from mechscope.models.adapters.base import Adapter, Place
from mechscope.models.lens import FIRST, heads


class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)
    norm_kind = "layernorm"
    rotary = False  # learned positions: no hook_rot_q|k
    mlp_flat = True

    embed = "model.decoder.embed_tokens"
    pos_embed = "model.decoder.embed_positions"
    layers = "model.decoder.layers"
    final_norm = "model.decoder.final_layer_norm"

    attn = "self_attn"
    out_proj = "self_attn.out_proj"
    attn_norm = "self_attn_layer_norm"
    mlp_norm = "final_layer_norm"  # the layer's own, before its MLP
    down_proj = "fc2"
    attn_out = Place("self_attn", FIRST)
    mlp_out = Place("fc2")
    mlp_pre = Place("fc1")

    def check(self) -> None:
        c = self.hf.config
        if not c.do_layer_norm_before or c._remove_final_layer_norm:
            raise UnsupportedModelError("OPT with its norms after the sublayers (opt-350m) is not supported yet: "
                                        "the family tests cover OPT with a LayerNorm before each sublayer")
        if c.word_embed_proj_dim != c.hidden_size or not c.layer_norm_elementwise_affine:
            raise UnsupportedModelError("OPT with embedding projections (word_embed_proj_dim != hidden_size) or "
                                        "LayerNorms without weights is not supported yet")

    def qkv(self) -> dict[str, Place]:
        return {name: Place(f"self_attn.{name}_proj", heads(self.cfg.d_head)) for name in "qkv"}
