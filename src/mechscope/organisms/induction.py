"""A two-layer transformer that learns induction here, in seconds: ground truth for discovery.

Trained on random token sequences repeated once ([s_1 .. s_L, s_1 .. s_L]), the only way to
predict the second half is induction (Olsson et al. 2022): a previous-token head in layer 0 writes
"the token before me" at each position, and an induction head in layer 1 uses it as its key to find
the earlier occurrence of the current token and copy the token after it. Nobody chose those heads
or those edges; training found them, and the detectors (`analysis.heads`) say which they are.

It is a standard Hugging Face Llama (2 layers, 4 heads, d_model 64, rotary positions, so a
previous-token head is easy to learn), seeded, deterministic.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mechscope.models.hooked import HookedModel
from mechscope.tasks.batch import ContrastiveBatch

VOCAB = 48
N_POS = 32  # training sequences: random filler, then a random segment of 4 to 16 tokens twice


def config() -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, hidden_size=64,
                       intermediate_size=128, max_position_embeddings=2 * N_POS, vocab_size=VOCAB,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)


def repeated(n: int, length: int, *, generator: torch.Generator, total: int = N_POS) -> torch.Tensor:
    """[n, total]: random filler, then `length` random tokens, then the same tokens again. The segment
    sits at a different place for each length, so no head can find the earlier occurrence by its
    position alone: it has to match tokens."""
    tokens = torch.randint(VOCAB, (n, total), generator=generator)  # [n, total]
    tokens[:, total - length:] = tokens[:, total - 2 * length:total - length]
    return tokens


def train(*, seed: int = 0, steps: int = 1200, batch_size: int = 32, lr: float = 1e-3) -> tuple[HookedModel, list[float]]:
    """(the trained model in float64, loss on the repeated half every 50 steps)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = LlamaForCausalLM(config())
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=0.0)
    curve = []
    hf.train()
    for step in range(steps):
        length = int(torch.randint(4, N_POS // 2 + 1, (), generator=g))
        tokens = repeated(batch_size, length, generator=g)  # [batch, pos]
        logits = hf(input_ids=tokens).logits  # [batch, pos, vocab]
        # the loss on the repeat only: the filler is unpredictable, and its loss would only add noise
        loss = torch.nn.functional.cross_entropy(logits[:, N_POS - length:-1].flatten(0, 1),
                                                 tokens[:, N_POS - length + 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 49:  # near zero once induction works
            curve.append(loss.item())
    return HookedModel(hf.eval().double()), curve


def repeat_loss(model: HookedModel, *, n: int = 256, length: int = 12, seed: int = 1234) -> float:
    """Mean loss (nats) on the repeat of held-out sequences, after its first token (chance: ln 48)."""
    tokens = repeated(n, length, generator=torch.Generator().manual_seed(seed)).to(model.device)  # [n, pos]
    with torch.no_grad():
        logits = model(tokens)  # [n, pos, vocab]
    return torch.nn.functional.cross_entropy(logits[:, N_POS - length:-1].flatten(0, 1).double(),
                                             tokens[:, N_POS - length + 1:].flatten()).item()


def contrast(model: HookedModel, n: int = 32, *, length: int = 8, total: int = 24, seed: int = 0) -> ContrastiveBatch:
    """Clean: [filler, s_1 .. s_L, s_1 .. s_{L-1}], answer s_L (only induction can know it); corrupt:
    the first s replaced by other random tokens, so the earlier occurrence is gone. Wrong answer: a
    random token not in the prompt."""
    g = torch.Generator().manual_seed(seed)
    clean = repeated(n, length, generator=g, total=total)[:, :-1]  # [n, total - 1]
    corrupt = clean.clone()
    first = slice(total - 2 * length, total - length)
    corrupt[:, first] = torch.randint(VOCAB, (n, length), generator=g)
    answer = clean[:, total - length - 1]
    wrong = torch.tensor([next(t for t in torch.randperm(VOCAB, generator=g).tolist() if t not in row)
                          for row in clean.tolist()])
    read = torch.full((n,), clean.shape[1] - 1)
    dev = model.device
    return ContrastiveBatch(clean=clean.to(dev), corrupt=corrupt.to(dev), answer=answer.to(dev), wrong=wrong.to(dev),
                            read_pos=read.to(dev), clean_prompts=tuple(str(r) for r in clean.tolist()),
                            corrupt_prompts=tuple(str(r) for r in corrupt.tolist()))
