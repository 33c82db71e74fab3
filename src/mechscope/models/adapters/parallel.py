"""Families whose attention and MLP read one norm of the same stream and add to it together
(parallel residual, as GPT-J introduced): GPT-J, Phi (1, 1.5, 2) and Cohere. There is no resid_mid."""

from mechscope.errors import UnsupportedModelError
from mechscope.models.adapters.base import Adapter, Place
from mechscope.models.lens import FIRST, OUT, heads


class GPTJAdapter(Adapter):
    """GPT-J: one LayerNorm read by attention and MLP in parallel, partial rotary, no attention biases."""

    family = "gptj"
    model_types = ("gptj",)
    norm_kind = "layernorm"

    embed = "transformer.wte"
    layers = "transformer.h"
    final_norm = "transformer.ln_f"

    attn = "attn"
    out_proj = "attn.out_proj"
    attn_norm = "ln_1"
    down_proj = "mlp.fc_out"
    mlp_pre = Place("mlp.fc_in")
    mlp_norm = "ln_1"  # the MLP reads the same norm's output
    attn_out = Place("attn", FIRST)
    mlp_out = Place("mlp", OUT)

    def parallel_residual(self) -> bool:
        return True

    def qkv(self) -> dict[str, Place]:
        return {name: Place(f"attn.{name}_proj", heads(self.cfg.d_head)) for name in "qkv"}


class PhiAdapter(Adapter):
    """Phi (1, 1.5, 2): GPT-J's parallel layout with Llama's names, biases, partial rotary."""

    family = "phi"
    model_types = ("phi",)
    norm_kind = "layernorm"

    embed = "model.embed_tokens"
    layers = "model.layers"
    final_norm = "model.final_layernorm"

    attn = "self_attn"
    out_proj = "self_attn.dense"
    attn_norm = "input_layernorm"
    down_proj = "mlp.fc2"
    mlp_pre = Place("mlp.fc1")
    mlp_norm = "input_layernorm"
    attn_out = Place("self_attn", FIRST)
    mlp_out = Place("mlp", OUT)

    def check(self) -> None:
        if self.hf.config.qk_layernorm:
            raise UnsupportedModelError("Phi with qk_layernorm is not supported yet: the family tests cover it "
                                        "without q/k norms")

    def parallel_residual(self) -> bool:
        return True

    def qkv(self) -> dict[str, Place]:
        return {name: Place(f"self_attn.{name}_proj", heads(self.cfg.d_head)) for name in "qkv"}


class CohereAdapter(PhiAdapter):
    """Cohere (Command R): Phi's parallel layout with a gated MLP, a LayerNorm without bias that
    computes in float32, and logits multiplied by `logit_scale` (in W_U too, so direct logit
    attribution adds up to the logits)."""

    family = "cohere"
    model_types = ("cohere",)
    norm_kind = "layernorm32"

    final_norm = "model.norm"
    out_proj = "self_attn.o_proj"
    down_proj = "mlp.down_proj"
    mlp_pre = Place("mlp.gate_proj")
    mlp_pre_linear = Place("mlp.up_proj")

    def check(self) -> None:
        if self.hf.config.use_qk_norm:
            raise UnsupportedModelError("Cohere with use_qk_norm (Command R+) is not supported yet: its q/k norms "
                                        "are not covered by the family tests")

    @property
    def logit_scale(self) -> float | None:
        return float(self.hf.logit_scale)
