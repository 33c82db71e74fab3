"""Attention's own sites: what exists only inside a family's attention computation.

- `hook_pattern` and `hook_attn_scores` exist only in eager attention. While one is hooked, the
  model runs mechscope's attention implementation (registered with transformers' AttentionInterface),
  which calls the family's own `eager_attention_forward` and runs the hooks on its softmax's input
  and output (`AttentionSwitch`); a family whose attention is a method of its module (GPT-Neo's
  `_attn`) gets that method wrapped on the one module instead (`MethodSwitch`).
- `hook_rot_q|k` are q and k after rotary embeddings, seen through a thin wrapper around whatever
  attention implementation the model runs (SDPA stays SDPA).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mechscope.errors import UnsupportedModelError
from mechscope.models.sites import Attachment, HookFn, HookPoint, _run


PATTERN_IMPLEMENTATION = "mechscope_eager"


def _rotated(module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query and key as attention uses them (after rotary), through any `hook_rot_q|k` hooks, which see
    them as [batch, pos, head, d_head] (k per key/value head)."""
    hooks = getattr(module, "_mechscope_rot_hooks", None)
    if not hooks:
        return query, key
    out = {"q": query, "k": key}
    for which in ("q", "k"):
        for fn, point, backward in list(hooks[which]):
            new = _run(fn, point, out[which].transpose(1, 2), backward)
            if new is not None:
                out[which] = new.transpose(1, 2)
    return out["q"], out["k"]


def _pattern_attention(module, query, key, value, attention_mask, **kwargs):
    """The family's own eager attention, with `hook_rot_q|k` hooks on its inputs and `hook_pattern`
    hooks run on its weights.

    query [batch, head, q_pos, d_head]; key, value [batch, kv_head, k_pos, d_head].
    """
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__} has no eager attention to read patterns from")
    query, key = _rotated(module, query, key)
    score_hooks = getattr(module, "_mechscope_score_hooks", ())
    if score_hooks:
        out, weights = _with_scores(eager, score_hooks, module, query, key, value, attention_mask, **kwargs)
    else:
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    for fn, point, backward in list(getattr(module, "_mechscope_pattern_hooks", ())):
        new = _run(fn, point, weights, backward)  # [batch, head, q_pos, k_pos]
        if new is not None:
            weights = new
            v = value.repeat_interleave(weights.shape[1] // value.shape[1], dim=1)  # [batch, head, k_pos, d_head]
            out = torch.matmul(weights, v).transpose(1, 2).contiguous()  # [batch, q_pos, head, d_head]
    return out, weights


def _with_scores(eager, hooks, *args, pattern_hooks=(), **kwargs):
    """The family's eager attention with `hook_attn_scores` hooks run on the input of its softmax:
    the scores as it computes them (scaled, soft-capped where the family caps, masked), and
    `pattern_hooks` on its output (for attention written inline, where that output is what the
    values are weighted by). Every family's eager attention takes exactly one
    `nn.functional.softmax`, over the keys; it is intercepted for the length of this one call, and a
    family that never calls it is refused."""
    import torch.nn.functional as F

    softmax, seen = F.softmax, []

    def scored(scores, *a, **k):
        if seen:
            return softmax(scores, *a, **k)
        seen.append(scores.shape)  # the attention scores, [batch, head, q_pos, k_pos]
        for fn, point, backward in list(hooks):
            new = _run(fn, point, scores, backward)
            if new is not None:
                scores = new
        weights = softmax(scores, *a, **k)  # the pattern, [batch, head, q_pos, k_pos]
        if pattern_hooks:  # seen in the model's dtype (BLOOM's float32 softmax is cast to it right after)
            weights = weights.to(scores.dtype)
        for fn, point, backward in list(pattern_hooks):
            new = _run(fn, point, weights, backward)
            if new is not None:
                weights = new
        return weights

    F.softmax = scored
    try:
        result = eager(*args, **kwargs)
    finally:
        F.softmax = softmax
    if not seen:
        raise UnsupportedModelError("this family's eager attention takes no nn.functional.softmax, so "
                                    "hook_attn_scores cannot be read there")
    return result


class MethodSwitch:
    """For a family whose attention is a method of its module (GPT-Neo's `_attn(query, key, value,
    mask) -> (output, weights)`), not Hugging Face's pluggable kind: while a pattern or the scores of
    this one module are hooked, that method runs the hooks (the scores through `_with_scores`, the
    pattern on the weights it returns, the output recomputed from a written pattern)."""

    def __init__(self, module: nn.Module, method: str):
        self.module, self.method, self.count = module, method, 0

    def acquire(self, kind: str = "pattern") -> None:
        if self.count == 0:
            self._install()
        self.count += 1

    def release(self, kind: str = "pattern") -> None:
        self.count -= 1
        if self.count == 0:
            del self.module.__dict__[self.method]

    def _install(self) -> None:
        module, original = self.module, getattr(type(self.module), self.method)

        def own(*args, **kwargs):
            return original(module, *args, **kwargs)

        def hooked(query, key, value, attention_mask=None):
            score_hooks = module.__dict__.get("_mechscope_score_hooks", ())
            if score_hooks:
                out, weights = _with_scores(own, score_hooks, query, key, value, attention_mask)
            else:
                out, weights = own(query, key, value, attention_mask)
            for fn, point, backward in list(module.__dict__.get("_mechscope_pattern_hooks", ())):
                new = _run(fn, point, weights, backward)  # [batch, head, q_pos, k_pos]
                if new is not None:
                    weights = new
                    out = torch.matmul(weights.to(value.dtype), value)  # [batch, head, q_pos, d_head]
            return out, weights

        self.module.__dict__[self.method] = hooked


class InlineSwitch:
    """For a family whose attention is written inline in its module's forward (Bloom, Falcon), neither
    Hugging Face's pluggable kind nor a method to wrap: while a pattern or the scores of this one module
    are hooked, its forward runs with its one softmax intercepted (`_with_scores`): the scores hooks
    on the softmax's input, the pattern hooks on its output, which the forward then uses as its own.
    `eager`: the model's AttentionSwitch, for a family that takes that inline path only in eager mode
    (Falcon's SDPA branch never forms the pattern). While rotated q/k are hooked ("rot"), the module's
    own `apply_rotary_pos_emb` runs `hook_rot_q|k` on what it returns, on whichever branch."""

    def __init__(self, module: nn.Module, eager: "AttentionSwitch | None" = None, kv_heads: int | None = None):
        self.module, self.eager, self.count, self.kv_heads = module, eager, 0, kv_heads

    def acquire(self, kind: str = "pattern") -> None:
        if self.eager is not None and kind == "pattern":
            self.eager.acquire(kind)
        if self.count == 0:
            module, original = self.module, type(self.module).forward

            def hooked(*args, **kwargs):
                scores = module.__dict__.get("_mechscope_score_hooks", ())
                patterns = module.__dict__.get("_mechscope_pattern_hooks", ())
                with _rotary_hooked(module, self.kv_heads):
                    if not (scores or patterns):
                        return original(module, *args, **kwargs)
                    return _with_scores(original, scores, module, *args, pattern_hooks=patterns, **kwargs)

            module.__dict__["forward"] = hooked
        self.count += 1

    def release(self, kind: str = "pattern") -> None:
        self.count -= 1
        if self.count == 0:
            del self.module.__dict__["forward"]
        if self.eager is not None and kind == "pattern":
            self.eager.release(kind)


@contextmanager
def _rotary_hooked(module: nn.Module, kv_heads: int | None):
    """While `module` runs: its modeling file's `apply_rotary_pos_emb` followed by `hook_rot_q|k`. Keys
    that the module already repeated per query head (Falcon's new architecture) are shown per
    key/value head, and a written one is repeated again."""
    if not any(getattr(module, "_mechscope_rot_hooks", {}).values()):
        yield
        return
    namespace = sys.modules[type(module).__module__]
    apply = namespace.apply_rotary_pos_emb

    def rotated(q, k, *args, **kwargs):  # q, k [batch, head, pos, d_head]
        q, k = apply(q, k, *args, **kwargs)
        group = k.shape[1] // (kv_heads or k.shape[1])
        if group == 1:
            return _rotated(module, q, k)
        own = k[:, ::group]  # [batch, kv_head, pos, d_head]: each group's copies are one key
        q, new = _rotated(module, q, own)
        return q, k if new is own else new.repeat_interleave(group, dim=1)

    namespace.apply_rotary_pos_emb = rotated
    try:
        yield
    finally:
        namespace.apply_rotary_pos_emb = apply


class AttentionSwitch:
    """Routes attention through mechscope while hooks inside it are attached, and back after: the
    family's eager attention while a pattern is hooked (the fast kernels never form it); while only
    rotated q/k are hooked, the model's own implementation (SDPA, say) behind a thin wrapper, so
    its numbers do not change."""

    def __init__(self, hf_model: nn.Module):
        self.config = hf_model.config
        self.counts = {"pattern": 0, "rot": 0}
        self.saved: str | None = None

    def acquire(self, kind: str = "pattern") -> None:
        if not any(self.counts.values()):
            self.saved = self.config._attn_implementation
        self.counts[kind] += 1
        self._apply()

    def release(self, kind: str = "pattern") -> None:
        self.counts[kind] -= 1
        if any(self.counts.values()):
            self._apply()
        else:
            self.config._attn_implementation = self.saved

    def _apply(self) -> None:
        from transformers import AttentionInterface

        _register_pattern_attention()
        if self.counts["pattern"] or self.saved not in AttentionInterface._global_mapping:  # (eager is no entry)
            self.config._attn_implementation = PATTERN_IMPLEMENTATION
        else:
            self.config._attn_implementation = _register_rotated(self.saved)


def _register_pattern_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if PATTERN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PATTERN_IMPLEMENTATION, _pattern_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(PATTERN_IMPLEMENTATION, eager_mask)


def _register_rotated(saved: str) -> str:
    """An attention implementation that runs `hook_rot_q|k` hooks, then `saved` with its own masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = f"mechscope_rot_{saved}"
    if name not in AttentionInterface._global_mapping:
        inner = AttentionInterface._global_mapping[saved]

        def attention(module, query, key, value, attention_mask, **kwargs):
            query, key = _rotated(module, query, key)
            return inner(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[saved])
    return name


@dataclass(frozen=True)
class RotarySite:
    """q or k as attention uses them, after rotary embeddings: [batch, pos, head, d_head] (k per
    key/value head). TransformerLens's `hook_rot_q|k`."""

    attn: nn.Module
    switch: AttentionSwitch
    which: str  # "q" or "k"

    def attach(self, fn: HookFn, point: HookPoint, backward: bool, att: Attachment) -> None:
        hooks = self.attn.__dict__.setdefault("_mechscope_rot_hooks", {"q": [], "k": []})
        entry = (fn, point, backward)
        hooks[self.which].append(entry)
        self.switch.acquire("rot")
        att.on_remove(lambda: self.switch.release("rot"))
        att.on_remove(lambda: hooks[self.which].remove(entry))


@dataclass(frozen=True)
class EagerSite:
    """A site that exists only in eager attention; hooking it switches the module there.

    "pattern": the attention weights after the softmax, [batch, head, q_pos, k_pos].
    "scores": the scores before it, as the family's eager attention computes them: scaled,
    soft-capped (Gemma 2), and masked (the mask's large negative value where a key is hidden, not -inf).
    """

    attn: nn.Module
    switch: AttentionSwitch
    kind: str  # "pattern" or "scores"

    def attach(self, fn: HookFn, point: HookPoint, backward: bool, att: Attachment) -> None:
        hooks = self.attn.__dict__.setdefault(f"_mechscope_{'pattern' if self.kind == 'pattern' else 'score'}_hooks", [])
        entry = (fn, point, backward)
        hooks.append(entry)
        self.switch.acquire()
        att.on_remove(self.switch.release)
        att.on_remove(lambda: hooks.remove(entry))
