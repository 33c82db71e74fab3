"""Every Python snippet of the README runs, in order, as a newcomer would paste them: on a tiny
random model shaped like SmolLM2 (24 layers, 9 heads, 3 key/value heads), so that every head and
layer the README names exists, standing in for `load_model("smollm2-135m")`. It checks that the
code is right (imports, names, signatures), not the numbers, which the real tier checks. A ```py
block starts Ray workers that load the real model, so it is shown, not run here:
tests/parity/test_distributed.py makes the same calls."""

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import mechscope
from conftest import word_tokenizer
from mechscope import HookedModel

README = Path(__file__).resolve().parents[2] / "README.md"


def smollm2_shaped() -> HookedModel:
    tokenizer = word_tokenizer()
    config = LlamaConfig(hidden_size=72, num_hidden_layers=24, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=144, vocab_size=len(tokenizer), max_position_embeddings=128)
    torch.manual_seed(0)
    return HookedModel(AutoModelForCausalLM.from_config(config).eval(), tokenizer)


def test_every_readme_snippet_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 6
    model = smollm2_shaped()
    monkeypatch.setattr(mechscope, "load_model", lambda *args, **kwargs: model)
    monkeypatch.chdir(tmp_path)  # where a snippet saves a file
    namespace: dict = {}
    for i, code in enumerate(blocks, 1):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
    assert namespace["probe"].site == "blocks.12.hook_resid_post" and (tmp_path / "r.json").is_file()


def test_the_readme_families_table_is_the_adapters_own():
    """One source of truth: the README's table is `mechscope models families --markdown`."""
    from pathlib import Path

    from mechscope.models.adapters import families_markdown

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- families:start -->\n")[1].split("<!-- families:end -->")[0]
    assert block == families_markdown(), "regenerate it: mechscope models families --markdown"
