"""Generation with hooks, and where a forward stands in the sequence.

`generate` is transformers' own `generate` (KV cache included) run inside `model.hooks(...)`, so a
hook fires at every step: on the whole prompt first, then on one new position per step. With no
hooks it is exactly the plain call. During a cached step a hook sees only the new positions; a hook
that must know which absolute positions it sees (an intervention at chosen positions) asks
`position_offset()`: 0 for an ordinary forward, the number of tokens already cached during
generation.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import InputError, MechscopeError

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel, Hooks

_OFFSET: ContextVar[int] = ContextVar("mechscope_position_offset", default=0)


def position_offset() -> int:
    """The absolute position of index 0 of the activations the current forward computes."""
    return _OFFSET.get()


def generate(model: "HookedModel", tokens, *, max_new_tokens: int, fwd_hooks: "Hooks" = (),
             do_sample: bool = False, **kwargs):
    """See `HookedModel.generate`."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a whole number of at least 1, not {max_new_tokens!r}")
    text_in = isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str))
    if text_in:
        ids, mask = _left_padded(model, [tokens] if isinstance(tokens, str) else list(tokens))
    else:
        ids, mask = model._as_tokens(tokens), kwargs.pop("attention_mask", None)
    total = ids.shape[1] + max_new_tokens
    if 0 < model.cfg.n_ctx < total:
        raise InputError(f"{ids.shape[1]} prompt tokens + {max_new_tokens} new ones are more than "
                         f"{model.cfg.model_name}'s context of {model.cfg.n_ctx}; ask for fewer new tokens")
    kwargs.setdefault("pad_token_id", model.pad_token_id)

    calls = [0]

    def track(module, args, kw):
        cache = kw.get("cache", kw.get("past_key_values"))  # the name changed in transformers 5
        if cache is None and calls[0] > 0 and kw.get("use_cache", True):
            raise MechscopeError("this transformers version passes the KV cache under a name mechscope does not "
                                 "know, so a hook could not tell which positions a step computes; pass "
                                 "use_cache=False to generate")
        calls[0] += 1
        _OFFSET.set(cache.get_seq_length() if cache is not None else 0)

    handle = model.hf.register_forward_pre_hook(track, with_kwargs=True)
    token = _OFFSET.set(0)
    try:
        with model.hooks(fwd_hooks):
            out = model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=do_sample, **kwargs)
    finally:
        handle.remove()
        _OFFSET.reset(token)
    sequences: Tensor = out if isinstance(out, Tensor) else out.sequences  # [batch, prompt + new]
    if not text_in:
        return out
    texts = model.tokenizer.batch_decode(sequences, skip_special_tokens=True)
    return texts[0] if isinstance(tokens, str) else texts


def _left_padded(model: "HookedModel", texts: list[str]) -> tuple[Tensor, Tensor | None]:
    """Prompts padded on the left (generation appends on the right), with the attention mask that
    hides the padding; None when all prompts have one length (then nothing is padded)."""
    rows = model._encode(texts, None)
    width = max(len(r) for r in rows)
    if min(len(r) for r in rows) == 0:
        raise InputError("an empty prompt has nothing to continue from; give some text")
    pad = model.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)  # [batch, pos]
    if all(len(r) == width for r in rows):
        return model._as_tokens(ids), None
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    return model._as_tokens(ids), mask
