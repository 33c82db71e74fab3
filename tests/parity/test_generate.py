"""Generation: with no hooks, exactly transformers' generate; with hooks, exactly what a greedy loop
of full forwards (no KV cache) with the same hooks produces, on every family."""

import pytest
import torch

from conftest import ALL_FAMILIES, FAMILIES, byte_tokenizer, tiny_hf, tiny_model
from mechscope import HookedModel, InputError
from mechscope.probes import ablate_direction, steer

pytestmark = pytest.mark.usefixtures("no_grad")
NEW = 6


def greedy_loop(model, tokens, hooks, new=NEW):
    """The literal reference: one full forward per new token, hooks on every forward."""
    seq = tokens
    for _ in range(new):
        logits = model.run_with_hooks(seq, fwd_hooks=hooks)  # [batch, pos, d_vocab]
        seq = torch.cat([seq, logits[:, -1].float().argmax(-1, keepdim=True)], 1)  # generate picks in float32
    return seq


def test_generate_without_hooks_is_transformers_generate(model, tokens):
    ours = model.generate(tokens[:, :5], max_new_tokens=NEW)
    theirs = model.hf.generate(input_ids=tokens[:, :5], max_new_tokens=NEW, do_sample=False,
                               pad_token_id=model.pad_token_id)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, greedy_loop(model, tokens[:, :5], []))  # the KV cache changes nothing


def test_text_prompts_of_different_lengths_match_left_padded_transformers(model):
    prompts = ["the cat", "a dog ran far"]
    tok = byte_tokenizer()
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    theirs = model.hf.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    assert model.generate(prompts, max_new_tokens=NEW) == tok.batch_decode(theirs, skip_special_tokens=True)
    assert model.generate("the cat", max_new_tokens=NEW).startswith("the cat")


def test_hooks_apply_at_every_step(model, tokens):
    """Steering every position, steering one prompt position, steering a position that only
    generation reaches, and projecting out a direction of a head's z: each gives what the loop of
    full forwards gives, and changes the text (so the comparison could fail)."""
    prompt = tokens[:, :5]
    d = model.cfg.d_model
    u = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=0)
    site = "blocks.0.hook_resid_post"
    plain = model.generate(prompt, max_new_tokens=NEW)
    cases = [[steer(site, u, 30.0)], [steer(site, u, 30.0, positions=[1])], [steer(site, u, 30.0, positions=[7])],
             [ablate_direction("blocks.1.attn.hook_z", torch.ones(model.cfg.d_head), head=0)],
             [("blocks.1.attn.hook_pattern", lambda p, h: p * 0.5)]]
    for hooks in cases:
        ours = model.generate(prompt, max_new_tokens=NEW, fwd_hooks=hooks)
        assert torch.equal(ours, greedy_loop(model, prompt, hooks)), hooks
    changed = [not torch.equal(model.generate(prompt, max_new_tokens=NEW, fwd_hooks=h), plain) for h in cases[:3]]
    assert all(changed)
    assert torch.equal(model.generate(prompt, max_new_tokens=NEW), plain)  # nothing stays attached


def test_bad_generation_requests_are_refused():
    m = tiny_model("gpt2")
    with pytest.raises(InputError, match="max_new_tokens"):
        m.generate("hi", max_new_tokens=0)
    with pytest.raises(InputError, match="context"):
        m.generate("hi", max_new_tokens=100)
    with pytest.raises(InputError, match="empty prompt"):
        m.generate(["", "x"], max_new_tokens=2)


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f not in FAMILIES])
def test_generation_on_the_families_outside_the_deep_suite(family, tokens):
    """Without hooks, transformers' generate; with hooks (a steer at every position, a steer at a
    position only generation reaches, a written pattern), the loop of full forwards; and a steer
    changes the text."""
    model = HookedModel(tiny_hf(family), byte_tokenizer())
    prompt = tokens[:, :5]
    plain = model.generate(prompt, max_new_tokens=NEW)
    theirs = model.hf.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=model.pad_token_id)
    assert torch.equal(plain, theirs)
    u = torch.nn.functional.normalize(torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64), dim=0)
    cases = [[steer("blocks.0.hook_resid_post", u, 30.0)], [steer("blocks.0.hook_resid_post", u, 30.0, positions=[7])],
             [("blocks.1.attn.hook_pattern", lambda p, h: p * 0.5)]]
    for hooks in cases:
        ours = model.generate(prompt, max_new_tokens=NEW, fwd_hooks=hooks)
        assert torch.equal(ours, greedy_loop(model, prompt, hooks)), hooks
    assert not torch.equal(model.generate(prompt, max_new_tokens=NEW, fwd_hooks=cases[0]), plain)
