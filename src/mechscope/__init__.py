"""mechscope: a workbench for reverse-engineering circuits in Hugging Face causal language models.

    import mechscope
    model = mechscope.load_model("smollm2-135m")
    logits, cache = model.run_with_cache(model.to_tokens("When Mary and John went to the store, John gave a drink to"))
"""

from mechscope.cache import ActivationCache
from mechscope.errors import HookNameError, InputError, MechscopeError, ModelLoadError, UnsupportedModelError
from mechscope.models.adapters.base import ModelConfig
from mechscope.models.hooked import HookedModel
from mechscope.models.load import load_model
from mechscope.models.sites import HookPoint

__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "HookPoint",
    "HookNameError",
    "HookedModel",
    "InputError",
    "MechscopeError",
    "ModelConfig",
    "ModelLoadError",
    "UnsupportedModelError",
    "load_model",
]
