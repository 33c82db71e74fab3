"""One adapter per model family; `adapter_for` picks the one whose `model_types` holds the model's
`config.model_type`. Only families proven by the family parity tests are accepted: a model that
merely has Llama's module names may compute something else (norms after attention, multipliers on
the residual stream), and wrapping it would give hook values that are not what the model adds."""

from __future__ import annotations

from torch import nn

from mechscope.errors import UnsupportedModelError
from mechscope.models.adapters.base import Adapter, ModelConfig
from mechscope.models.adapters.bloom import BloomAdapter
from mechscope.models.adapters.falcon import FalconAdapter
from mechscope.models.adapters.gemma import Gemma2Adapter, Gemma3Adapter
from mechscope.models.adapters.gpt2 import GPT2Adapter, GPTBigCodeAdapter, GPTNeoAdapter
from mechscope.models.adapters.llama import LlamaAdapter
from mechscope.models.adapters.neox import NeoXAdapter
from mechscope.models.adapters.opt import OPTAdapter
from mechscope.models.adapters.parallel import CohereAdapter, GPTJAdapter, PhiAdapter
from mechscope.models.adapters.variants import VARIANTS

ADAPTERS: tuple[type[Adapter], ...] = (GPT2Adapter, NeoXAdapter, LlamaAdapter, Gemma3Adapter, Gemma2Adapter, *VARIANTS,
                                       GPTBigCodeAdapter, GPTNeoAdapter, GPTJAdapter, PhiAdapter, CohereAdapter, OPTAdapter,
                                       BloomAdapter, FalconAdapter)

# Families that look like a supported one but compute something else: why each is refused (none at
# present; options a family's tests do not cover are refused by its adapter's `check`).
NOT_YET: dict[str, str] = {}


def families() -> list[dict]:
    """The supported families and the ones refused for now, with what sets each apart (from the
    adapters themselves: `mechscope models families` and the README table read this)."""
    import sys

    rows = []
    for a in ADAPTERS:
        about = (a.__doc__ or sys.modules[a.__module__].__doc__ or "").strip().split("\n\n")[0]
        rows.append({"family": a.family, "model_types": list(a.model_types), "norm": a.norm_kind,
                     "supported": True, "about": " ".join(about.split())})
    rows += [{"family": t, "model_types": [t], "norm": "", "supported": False, "about": f"refused: {why}"}
             for t, why in NOT_YET.items()]
    return rows


def families_markdown() -> str:
    """`families()` as the README's Markdown table (`mechscope models families --markdown`; a test
    keeps the README's copy equal to it)."""
    lines = ["| family | model_type | norm | what sets it apart |", "|---|---|---|---|"]
    for row in families():
        about = row["about"].replace("|", "\\|")
        lines.append(f"| {row['family']} | {', '.join(row['model_types'])} | {row['norm'] or '-'} | {about} |")
    return "\n".join(lines) + "\n"


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    supported = ", ".join(sorted(t for a in ADAPTERS for t in a.model_types))
    why = f" It is not supported yet: {NOT_YET[model_type]}." if model_type in NOT_YET else ""
    raise UnsupportedModelError(
        f"mechscope has no adapter for {type(model).__name__} (model_type={model_type!r}).{why} "
        f"Supported model types: {supported}. "
        "To add one, write src/mechscope/models/adapters/<family>.py after llama.py (or an entry in "
        "variants.py), add it to ADAPTERS, and prove it in tests/parity/test_families.py."
    )


__all__ = ["ADAPTERS", "Adapter", "ModelConfig", "adapter_for", "families", "families_markdown"]
