"""load_model: a zoo alias, a local Hugging Face directory, a .gguf file or a hub id -> HookedModel."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from mechscope.errors import InputError, ModelLoadError
from mechscope.models import zoo
from mechscope.models.hooked import HookedModel

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}  # float64: for checking an exactness claim, as the tests do


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = False,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> HookedModel:
    """Load and wrap a causal LM.

    spec: a zoo alias (`mechscope models list`: smollm2-135m, gemma3-270m, gpt2), a local Hugging
    Face directory, a path to a .gguf file, or a hub id. `device="auto"` spreads the model over the
    GPUs it finds, then the CPU, then disk (accelerate's device_map): `max_memory` ({0: "20GiB",
    "cpu": "30GiB"}) caps each, and what does not fit goes to `offload_folder`, read back layer by
    layer as the model runs.
    """
    kwargs = {"dtype": _dtype(dtype)}
    if str(device) == "auto":
        kwargs["device_map"] = "auto"
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    else:
        _check_device(device)
        if max_memory is not None or offload_folder is not None:
            raise InputError(f"max_memory and offload_folder place a model over devices: they need device='auto', "
                             f"not {str(device)!r}")
    name = spec = str(spec)
    if spec in zoo.ZOO:  # a zoo alias is its cached directory (fetched and verified if need be) or its hub id
        spec = zoo.ZOO[spec].hub_id or str(zoo.fetch(spec, progress=progress, verify="stamp"))
    with zoo.transformers_progress(progress):
        hf, tokenizer = _load_spec(spec, kwargs, alias=name if name in zoo.ZOO else None)
    if str(device) != "auto":
        hf = hf.to(device)
    hf.config.name_or_path = name
    return HookedModel(hf, tokenizer)


def _check_device(device: str | torch.device) -> None:
    """A clear error for a device this machine lacks, before any weight is read."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"device {device!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asks for CUDA, which this machine lacks (torch "
                             f"{torch.__version__} sees no CUDA GPU); use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r}: MPS is not available here; use device='cpu'")


def _load_spec(spec: str, kwargs: dict, alias: str | None = None):
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}")
        _check_gguf(path)
        try:
            copy = zoo.gguf_copy(path)  # dequantized once, then read as safetensors
        except OSError as err:  # no writable cache: dequantize this time only
            log.warning("cannot cache the dequantized %s (%s); converting it on every load", path.name, err)
            hf, tokenizer = _load(str(path.parent), {"gguf_file": path.name}, kwargs)
            zoo.drop_gguf_quantizer(hf)
            return hf, tokenizer
        return _load(str(copy), {}, kwargs)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (it has no config.json)")
        return _load(str(path), {}, kwargs)
    return _load_from_hub(spec, kwargs, alias)


def _check_gguf(path: Path) -> None:
    """A clear error for a file that is not a whole GGUF (truncated downloads are common)."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)  # memory-maps the file and reads its header and tensor table only
    except Exception as err:  # the reader raises ValueError, struct.error, ... on a bad file
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt? {err}); download it "
                             "again") from None


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _load(source: str, where: dict, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf = AutoModelForCausalLM.from_pretrained(source, **where, **kwargs)
    except Exception as err:  # any failure here (safetensors, config, hub) is a failure to load
        if where.get("local_files_only"):
            raise
        hint = ""
        alias = zoo.alias_of(source)
        if alias is not None:
            hint = f" The zoo's copy is damaged: `mechscope models fetch {alias} --force` stores it again."
        raise ModelLoadError(f"cannot load a causal LM from {source}: {err}.{hint}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **where)
    except (OSError, ValueError) as err:
        log.warning("no tokenizer for %s (%s); pass token ids to the model", source, err)
        tokenizer = None
    return hf, tokenizer


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub answers, and why not (a DNS failure answers in milliseconds)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        return False, f"{host}: {err}"
    return True, ""


def _load_from_hub(hub_id: str, kwargs: dict, alias: str | None = None):
    try:  # a copy in the local Hugging Face cache needs no network
        return _load(hub_id, {"local_files_only": True}, kwargs)
    except Exception:  # not in the local cache (or not loadable from it): ask the hub
        pass
    ok, why = hub_reachable()
    if not ok:
        offline = ", ".join(a for a, m in zoo.ZOO.items() if m.hub_id is None)
        what = (f"the zoo alias {alias!r} is the hub model {hub_id!r}, which is not in the local Hugging Face "
                "cache" if alias else f"{hub_id!r} is not a zoo alias, a local directory or a .gguf file, and "
                "it is not in the local Hugging Face cache")
        raise ModelLoadError(
            f"cannot load {alias or hub_id!r}: {what}, and the hub is unreachable ({why}). Models that "
            f"work offline: {offline} (see `mechscope models list`)."
        )
    return _load(hub_id, {}, kwargs)
