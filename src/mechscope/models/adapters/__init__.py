"""One adapter per model family; `adapter_for` picks the one that fits a Hugging Face model."""

from __future__ import annotations

from torch import nn

from mechscope.errors import UnsupportedModelError
from mechscope.models.adapters.base import Adapter, ModelConfig
from mechscope.models.adapters.gemma import Gemma3Adapter
from mechscope.models.adapters.gpt2 import GPT2Adapter
from mechscope.models.adapters.llama import LlamaAdapter
from mechscope.models.adapters.neox import NeoXAdapter

ADAPTERS: tuple[type[Adapter], ...] = (GPT2Adapter, NeoXAdapter, LlamaAdapter, Gemma3Adapter)


def _has_layout(model: nn.Module, adapter: type[Adapter]) -> bool:
    """Whether a model has every module an adapter names (for families we don't list by name)."""
    try:
        layer = model.get_submodule(adapter.layers)[0]
        for path in (adapter.embed, adapter.final_norm):
            model.get_submodule(path)
        for path in (adapter.out_proj, adapter.down_proj, adapter.mlp_norm, "self_attn.q_proj"):
            layer.get_submodule(path)
    except (AttributeError, IndexError, TypeError):
        return False
    return True


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    # Any decoder with Llama's module names (Mistral-likes, Qwen-likes, ...) works as Llama.
    if _has_layout(model, LlamaAdapter) and not hasattr(model.get_submodule("model.layers")[0],
                                                        "pre_feedforward_layernorm"):
        return LlamaAdapter(model)
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedModelError(
        f"mechscope has no adapter for {type(model).__name__} (model_type={model_type!r}). "
        f"Supported families: {supported}, and any model with Llama's module layout. "
        "To add one, write src/mechscope/models/adapters/<family>.py after llama.py and add it to "
        "ADAPTERS in src/mechscope/models/adapters/__init__.py."
    )


__all__ = ["ADAPTERS", "Adapter", "ModelConfig", "adapter_for"]
