"""Shared fixtures: tiny random models of every supported family, and the offline zoo models."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from mechscope import HookedModel

# Every test runs with PyTorch's deterministic kernels: a result that changes from run to run on one
# machine is a bug, never rounding to tolerate.
torch.use_deterministic_algorithms(True)

# Tiny random models run in float64, where an exact claim can be tested exactly: rounding differences
# between two ways of computing one number are about 1e-15 there, so 1e-10 tolerates every CPU's
# kernels and still catches any real error. (Transformers computes RMSNorm and eager softmax in float32
# even for a float64 model; both ways of computing see the same float64 inputs, so that rounding is
# the same in both and cancels.)
EXACT = dict(atol=1e-10, rtol=0)
# Except where Hugging Face itself rounds to float32 inside a float64 model: RMSNorm (Llama, Qwen2,
# Gemma) normalizes in float32, and eager attention (on while `hook_pattern` is hooked) takes its
# softmax in float32. Two computations that are equal in exact arithmetic but cross such a step
# differently (a linear fold of the norm, eager against SDPA) differ by float32 rounding of values of
# order 1, about 1e-7: the tolerance is float32's.
HF_FLOAT32 = dict(atol=1e-6, rtol=1e-6)
# Sites that exist only in eager attention: hooking one switches the model to it.
EAGER_SITES = ("hook_pattern", "hook_attn_scores")


def exact_for(model, *, eager: bool = False) -> dict:
    """EXACT, or HF_FLOAT32 where the comparison crosses one of Hugging Face's float32 steps (BLOOM's
    attention always takes its softmax in float32)."""
    float32 = eager or model.adapter.norm_kind != "layernorm" or model.adapter.attn_inline == "always"
    return HF_FLOAT32 if float32 else EXACT


def approx_for(model, *, eager: bool = False) -> dict:
    """`exact_for` as pytest.approx's keywords."""
    tol = exact_for(model, eager=eager)
    return dict(abs=tol["atol"], rel=tol["rtol"])

VOCAB = 300  # 256 bytes + specials, and some ids no text maps to


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte) that needs no download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of the IOI task (names, places, objects, template words, each with its
    leading space), so that a tiny random model can run the IOI study."""
    import re

    from mechscope.tasks.ioi import NAMES, OBJECTS, PLACES, TEMPLATES

    pieces = set(NAMES + PLACES + OBJECTS)
    for text in TEMPLATES.values():
        pieces.update(re.findall(WORD, re.sub(r"\{\w+\}", "", text)))
    vocab = {w: i for i, w in enumerate(sorted(pieces) + ["<bos>", "<eos>", "<pad>", "<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


WORD = r" ?[A-Za-z]+| ?[^A-Za-z\s]"


def ioi_model(name: str, seed: int = 0, layers: int | None = None) -> HookedModel:
    """A tiny random model of one family (optionally with more layers) with `word_tokenizer`."""
    tokenizer = word_tokenizer()
    config = _configs()[name]
    config.vocab_size = len(tokenizer)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config).eval().double()
    return HookedModel(hf, tokenizer)


def saved_ioi_model(folder, layers: int):
    """`ioi_model("llama-gqa", layers=...)` saved with its tokenizer into `folder`, for what loads a
    model by spec (Ray workers, accelerate's device maps); returns the folder."""
    ioi_model("llama-gqa", layers=layers).hf.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def bpe_word_model() -> HookedModel:
    """A tiny Llama (grouped-query) with a byte-level BPE trained here: IOI's words and half the
    positional study's words are frequent enough to become one token; the other study words are seen
    once and stay split (as long words are for a real tokenizer)."""
    from tokenizers import trainers

    from mechscope.studies.positions import words
    from mechscope.tasks.ioi import BABA, NAMES, OBJECTS, PLACES

    study = words()
    corpus = [" ".join(BABA) * 3] + [w * 50 for w in NAMES + PLACES + OBJECTS]
    corpus += [f" {w}" * 40 for w in study[::2]] + [f" {w}" for w in study[1::2]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=900, special_tokens=["<bos>", "<eos>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=128)
    torch.manual_seed(0)
    return HookedModel(AutoModelForCausalLM.from_config(config).eval().double(), tokenizer)


def _configs() -> dict:
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    return {
        "gpt2": GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=64, vocab_size=VOCAB),
        "neox": GPTNeoXConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=128, use_parallel_residual=True, rotary_pct=0.5, **common),
        "neox-seq": GPTNeoXConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=128, use_parallel_residual=False, **common),
        "llama-gqa": LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, **common),
        "qwen2": Qwen2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=1, intermediate_size=128, **common),
        "gemma3": Gemma3TextConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                   sliding_window=4, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   **common),
    }


FAMILIES = list(_configs())  # the deep suite: every technique's tests run on each


def _more_configs() -> dict:
    """Families proven by tests/parity/test_families.py alone (the same checks a family must pass,
    without every technique's own tests). Options that could hide a bug are set off their defaults."""
    from transformers import (CohereConfig, Gemma2Config, GemmaConfig, GPTBigCodeConfig, GPTJConfig, GPTNeoConfig, GptOssConfig, GraniteConfig, MistralConfig, MixtralConfig, OlmoConfig,
                              Olmo2Config, OlmoeConfig, OPTConfig, BloomConfig,
                              FalconConfig,
                              Phi3Config, PhiConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig, SmolLM3Config,
                              StableLmConfig, Starcoder2Config)

    common = dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=64, num_hidden_layers=3,
                  num_attention_heads=4, intermediate_size=128, bos_token_id=1, eos_token_id=2)
    moe = dict(experts_implementation="eager")  # the default grouped matmul has no float64 kernel
    return {
        "mistral": MistralConfig(num_key_value_heads=2, sliding_window=4, **common),
        "qwen3": Qwen3Config(num_key_value_heads=2, head_dim=16, **common),
        "gemma": GemmaConfig(num_key_value_heads=1, head_dim=16, **common),
        "starcoder2": Starcoder2Config(num_key_value_heads=2, use_bias=True, **common),
        "stablelm": StableLmConfig(num_key_value_heads=2, use_qkv_bias=True, partial_rotary_factor=0.25, **common),
        "phi3": Phi3Config(num_key_value_heads=2, pad_token_id=0, partial_rotary_factor=0.5, **common),
        "smollm3": SmolLM3Config(num_key_value_heads=2, no_rope_layers=[1, 0, 1], pad_token_id=0, **common),
        "gemma2": Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                               attn_logit_softcapping=2.0, final_logit_softcapping=5.0, **common),
        "mixtral": MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **moe, **common),
        "qwen2_moe": Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1],
                                    norm_topk_prob=True, **moe, **common),
        "qwen3_moe": Qwen3MoeConfig(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, **moe, **common),
        "gpt_oss": GptOssConfig(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                               "sliding_attention"], pad_token_id=0, **moe, **common),
        "olmoe": OlmoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                             pad_token_id=0, **moe, **common),
        "olmo2": Olmo2Config(num_key_value_heads=2, pad_token_id=0, **common),
        "opt": OPTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=128,
                         word_embed_proj_dim=64, max_position_embeddings=64, vocab_size=VOCAB, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        "bloom": BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2),
        "falcon": FalconConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, multi_query=True,
                               parallel_attn=True, new_decoder_architecture=False, alibi=False, bias=True,
                               vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2),
        "falcon-new": FalconConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_kv_heads=2,
                                   new_decoder_architecture=True, num_ln_in_parallel_attn=2, parallel_attn=True,
                                   alibi=False, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2),
        "phi": PhiConfig(partial_rotary_factor=0.5, **common),
        "gptj": GPTJConfig(n_embd=64, n_layer=3, n_head=4, n_positions=64, rotary_dim=8, vocab_size=VOCAB,
                           bos_token_id=1, eos_token_id=2),
        "gpt_bigcode": GPTBigCodeConfig(n_embd=64, n_layer=3, n_head=4, n_positions=64, multi_query=True,
                                        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
        "granite": GraniteConfig(num_key_value_heads=2, embedding_multiplier=3.0, residual_multiplier=0.4,
                                 attention_multiplier=0.3, logits_scaling=2.5, pad_token_id=0, **common),
        "olmo": OlmoConfig(num_key_value_heads=2, pad_token_id=0, **common),
        "cohere": CohereConfig(num_key_value_heads=2, logit_scale=0.5, pad_token_id=0, **common),
        "gpt_neo": GPTNeoConfig(hidden_size=64, num_layers=3, num_heads=4, attention_types=[[["global", "local"], 1],
                                                                                          [["local"], 1]],
                                window_size=4, max_position_embeddings=64, vocab_size=VOCAB, bos_token_id=1,
                                eos_token_id=2),
        "gpt_bigcode-mha": GPTBigCodeConfig(n_embd=64, n_layer=3, n_head=4, n_positions=64, multi_query=False,
                                            vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    }


ALL_FAMILIES = FAMILIES + list(_more_configs())


def tiny_hf(name: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A random model of one family, in float64 unless asked (see EXACT). Every parameter is
    perturbed, so norms are not identities and biases are not zero: nothing in a test holds only
    because a weight is trivial."""
    torch.manual_seed(seed)
    configs = _configs() if name in FAMILIES else _more_configs()
    model = AutoModelForCausalLM.from_config(configs[name])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval().to(dtype)


def tiny_model(name: str, seed: int = 0) -> HookedModel:
    return HookedModel(tiny_hf(name, seed), byte_tokenizer())


def tiny_othello() -> HookedModel:
    """A random 2-layer Othello-GPT for a 6x6 board (no training: for the code paths, not the figures)."""
    from transformers import GPT2LMHeadModel

    from mechscope.organisms.othello.train import model_config

    torch.manual_seed(0)
    return HookedModel(GPT2LMHeadModel(model_config(6, d_model=32, n_layers=2, n_heads=4)).eval(), tokenizer=None)


def tiny_batch(model: HookedModel):
    """Two clean/corrupt pairs of different lengths (right-padded), differing at a few positions."""
    from mechscope.tasks import ContrastiveBatch

    return ContrastiveBatch.from_pairs(
        model, ["the cat sat", "a dog ran far"], ["the rat sat", "a fox ran off"], ["a", "b"], ["c", "d"]
    )


@pytest.fixture
def no_grad():
    """Use with `pytestmark = pytest.mark.usefixtures("no_grad")` in modules that never need gradients."""
    with torch.no_grad():
        yield


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family) -> HookedModel:
    return tiny_model(family)


@pytest.fixture
def tokens() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, 9))


@pytest.fixture(scope="session")
def smollm2():
    import mechscope

    return mechscope.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_ioi(smollm2):
    """The IOI study on SmolLM2 (about 3 minutes here), shared by the real tests that need its heads."""
    from mechscope.studies import Settings, run_ioi

    with torch.no_grad():
        return run_ioi(smollm2, Settings(n=32, n_path=10, seed=3))


@pytest.fixture(scope="session")
def gemma3():
    import mechscope

    return mechscope.load_model("gemma3-270m")


@pytest.fixture(scope="session")
def qwen_coder():
    """The zoo's largest model (0.5B parameters, untied unembedding): the scale check of the families."""
    import mechscope

    return mechscope.load_model("qwen2.5-coder-0.5b")


@pytest.fixture
def make_read_only():
    """`make_read_only(folder)`: a folder no one can write into, root included (root ignores file
    modes, so as root it becomes a read-only bind mount; skipped where mounting is not allowed)."""
    import os
    import subprocess

    mounted, chmodded = [], []

    def apply(folder):
        if os.geteuid() != 0:
            folder.chmod(0o555)
            chmodded.append(folder)
            return
        for cmd in (["mount", "--bind", str(folder), str(folder)], ["mount", "-o", "remount,bind,ro", str(folder)]):
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                if cmd[1] != "--bind":
                    subprocess.run(["umount", str(folder)], capture_output=True)
                pytest.skip("as root, a read-only folder needs a bind mount, which this machine refuses")
        mounted.append(folder)

    yield apply
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)
    for folder in chmodded:
        folder.chmod(0o755)


def snapshot(folder) -> dict:
    """Every file under `folder` (hidden ones too) with its bytes, to assert a command changed nothing."""
    from pathlib import Path

    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else p.lstat().st_mode)
            for p in sorted(Path(folder).rglob("*"))}


def assert_relatively_close(actual, expected, rel: float, why: str) -> None:
    """max |actual - expected| <= rel * max |expected|: for float32 on a real model, where rounding
    grows with the size of what is compared and differs between CPUs' kernels, so a fixed atol is
    either too loose for small tensors or fails on large ones. `why` says where the rel comes from."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, (f"max error {error:.3g} is more than {rel:g} x max |expected| {scale:.3g} "
                                  f"({why})")
