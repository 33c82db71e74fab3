"""HookedModel: a Hugging Face causal LM with every activation reachable by TransformerLens names.

The model is never reimplemented: a forward is the Hugging Face forward, and hooks are PyTorch
hooks placed only for the duration of a `hooks()` context (removed in `finally`, always), or, as in
TransformerLens, added with `add_hook` until `reset_hooks()`. mechscope's techniques (`@technique`)
refuse a model with added hooks: they would act in some of a technique's runs and not in others.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.errors import InputError, UnsupportedModelError
from mechscope.models.adapters import adapter_for
from mechscope.models.adapters.base import ModelConfig
from mechscope.models.attention import AttentionSwitch
from mechscope.models.sites import Attachment, HookFn, HookPoint, build_sites, unknown_name_error

_PER_HEAD_COPIES = ("attn.hook_result", "hook_q_input", "hook_k_input", "hook_v_input")
Hooks = Sequence[tuple[str | Callable[[str], bool], HookFn]]
NamesFilter = str | Iterable[str] | Callable[[str], bool] | None


def technique(fn):
    """Marks a function of (model, ...) that runs the model its own way: it refuses a model with
    hooks added by `add_hook`, before any work (hooks in a `with model.hooks(...)` block are the
    caller's explicit choice and stay). A Result it returns (or a dict of them) says the dtype the
    model computed in, `extra["model_dtype"]` (the values themselves are at least float32)."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        model.require_no_added_hooks(fn.__name__)
        out = fn(model, *args, **kwargs)
        for result in (out.values() if isinstance(out, dict) else [out]):
            if isinstance(getattr(result, "extra", None), dict) and hasattr(result, "technique"):
                result.extra.setdefault("model_dtype", str(model.dtype).removeprefix("torch."))
        return out

    return run


def check_fits_in_memory(shape: tuple[int, int], d_vocab: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a CPU forward whose logits alone [batch, pos, d_vocab] exceed the memory available
    now: the run would swap for minutes or be killed. (Accelerators raise their own clear OOM.)"""
    need = shape[0] * shape[1] * d_vocab * dtype.itemsize
    if device.type != "cpu" or need < 2**28:  # small runs skip the look at /proc (every forward comes here)
        return
    have = _available_memory()
    if have is not None and need > have:
        raise InputError(f"{shape[0]} prompts of {shape[1]} tokens need {need / 2**30:.1f} GiB for the logits "
                         f"alone, and {have / 2**30:.1f} GiB of memory is available; use fewer prompts at once")


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class HookedModel:
    """A wrapped causal LM. `model(tokens)` returns logits [batch, pos, d_vocab].

    Prompts of different lengths are padded on the right: every real token then sees exactly the
    tokens it would see alone (causal attention never looks right), so no attention mask is needed
    and every activation at a real position is the unpadded one. `last_positions` tells where each
    prompt ends.
    """

    def __init__(self, hf_model: nn.Module, tokenizer=None):
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.adapter = adapter_for(hf_model)
        self.cfg: ModelConfig = self.adapter.cfg
        self._switch = AttentionSwitch(hf_model)
        self._sites = build_sites(self.adapter, self._switch)
        self._weights = None  # read on first use (`weights`)
        self._modules = {name: id(m) for name, m in hf_model.named_modules()}  # what the sites hook
        self._added: list[tuple[str, Attachment, bool]] = []  # add_hook's: (name, attachment, permanent)
        self.hook_names: list[str] = list(self._sites)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"HookedModel({c.model_name!r}, {c.architecture}, {c.n_layers} layers, "
            f"{c.n_heads} heads ({c.n_kv_heads} kv), d_model={c.d_model})"
        )

    @property
    def device(self) -> torch.device:
        return self.adapter.module(self.adapter.embed).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.W_U.dtype

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.adapter.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"] | None:
        return self.adapter.b_U

    @property
    def weights(self):
        """The weights in TransformerLens's layout, OV/QK circuits and composition scores
        (`models/weights.py`); also as `model.W_Q`, `W_K`, `W_V`, `W_O`, `W_E`, `W_in`, `W_out`."""
        from mechscope.models.weights import Weights

        if self._weights is None:
            self._weights = Weights(self)
        return self._weights

    W_Q = property(lambda self: self.weights.attention("q")[0], doc="[layer, head, d_model, d_head]")
    W_K = property(lambda self: self.weights.attention("k")[0], doc="[layer, kv_head, d_model, d_head]")
    W_V = property(lambda self: self.weights.attention("v")[0], doc="[layer, kv_head, d_model, d_head]")
    b_Q = property(lambda self: self.weights.attention("q")[1], doc="[layer, head, d_head]")
    b_K = property(lambda self: self.weights.attention("k")[1], doc="[layer, kv_head, d_head]")
    b_V = property(lambda self: self.weights.attention("v")[1], doc="[layer, kv_head, d_head]")
    W_O = property(lambda self: self.weights.W_O, doc="[layer, head, d_head, d_model]")
    b_O = property(lambda self: self.weights.b_O, doc="[layer, d_model]")
    W_E = property(lambda self: self.weights.W_E, doc="[d_vocab, d_model]")
    W_pos = property(lambda self: self.weights.W_pos, doc="[n_ctx, d_model] (learned positions only)")
    W_in = property(lambda self: self.weights.W_in, doc="[layer, d_model, d_mlp]")
    W_out = property(lambda self: self.weights.W_out, doc="[layer, d_mlp, d_model]")

    # ---- forward ----------------------------------------------------------------------------
    def __call__(
        self,
        tokens: Int[Tensor, "batch pos"] | str | list[str],
        *,
        attention_mask: Tensor | None = None,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        stop_at_layer: int | None = None,
    ):
        """Logits [batch, pos, d_vocab], exactly the plain Hugging Face call. As in TransformerLens:
        `return_type` "loss" (next-token cross-entropy, padding excluded when `attention_mask` says
        where it is; per token [batch, pos - 1] with `loss_per_token`), "both" ((logits, loss)) or None
        (for hooks' side effects); `stop_at_layer=l` returns the residual stream entering layer l
        ([batch, pos, d_model]; l = n_layers: after the last layer, before the final norm; negative l
        counts from the end) without running the layers after it."""
        if return_type not in ("logits", "loss", "both", None):
            raise InputError(f"return_type is 'logits', 'loss', 'both' or None, not {return_type!r}")
        tokens = self._as_tokens(tokens)
        if stop_at_layer is not None:
            return self._resid_entering(tokens, stop_at_layer, attention_mask)
        # Exactly the plain call: even use_cache stays at the model's default, since the KV cache
        # changes the memory layout of k and v, and with it the rounding of eager attention.
        logits = self.hf(input_ids=tokens, attention_mask=attention_mask).logits
        if return_type in ("logits", None):
            return logits if return_type else None
        loss = next_token_loss(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _resid_entering(self, tokens: Tensor, layer: int, attention_mask: Tensor | None) -> Tensor:
        n = self.cfg.n_layers
        if not -n <= layer <= n:
            raise InputError(f"stop_at_layer must be between {-n} and {n} for a {n}-layer model, not {layer}")
        layer = layer % n if layer < n else n
        name = f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"
        seen: dict[str, Tensor] = {}

        def stop(act, hook):
            seen["resid"] = act
            raise _Stopped

        try:
            with self.hooks([(name, stop)]):
                self.hf(input_ids=tokens, attention_mask=attention_mask)
        except _Stopped:
            pass
        return seen["resid"]

    forward = __call__

    def _as_tokens(self, tokens, *, whole_batch: bool = True) -> Tensor:
        """Token ids [batch, pos] on the model's device, checked. `whole_batch=False`: the caller runs
        them in smaller batches, so the memory check is left to those runs."""
        if isinstance(tokens, (list, tuple)) and not tokens:
            raise InputError("no prompts: give a string, a list of strings or token ids [batch, pos]")
        if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and isinstance(tokens[0], str)):
            tokens = self.to_tokens(tokens)
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise InputError(f"tokens must be integer ids [batch, pos]; got {tuple(tokens.shape)} {tokens.dtype}")
        if 0 in tokens.shape:
            raise InputError(f"no tokens to run (shape {tuple(tokens.shape)}): an empty prompt, with a tokenizer "
                             "that adds no BOS token, has nothing to predict from; give some text")
        if 0 < self.cfg.n_ctx < tokens.shape[1]:  # 0: the config names no context length
            raise InputError(f"{tokens.shape[1]} tokens are more than {self.cfg.model_name}'s context of "
                             f"{self.cfg.n_ctx} positions; shorten the prompts")
        if whole_batch:
            check_fits_in_memory(tokens.shape, self.cfg.d_vocab, self.dtype, self.device)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab):
            bad = tokens[(tokens < 0) | (tokens >= self.cfg.d_vocab)].unique()[:5].tolist()
            raise InputError(
                f"token ids {bad} are outside the vocabulary of {self.cfg.model_name} "
                f"(valid ids are 0 .. {self.cfg.d_vocab - 1}); use model.to_tokens(text) to encode text"
            )
        return tokens.to(self.device)

    def logits_from_resid(self, resid: Float[Tensor, "... d_model"], tokens: Tensor | None = None) -> Tensor:
        """What the model's head makes of a final residual stream: final norm, unembedding (and
        Gemma's logit soft-capping, where configured), [..., d_vocab]. Lets a caller unembed only
        some positions, and with `tokens` [batch, t] (resid [..., batch, d_model]) only those tokens'
        logits of each prompt, [..., batch, t]."""
        a = self.adapter
        normed = a.module(a.final_norm)(resid)
        head = a.unembed
        if tokens is None:
            logits = head(normed)  # [..., d_vocab]
        elif type(head) is torch.nn.Linear and not hasattr(head, "_hf_hook") and head.weight.device.type != "meta":
            tokens = tokens.to(head.weight.device)
            logits = torch.einsum("...bd,btd->...bt", normed, head.weight[tokens])  # [..., batch, t]
            logits = logits if head.bias is None else logits + head.bias[tokens]
        else:  # a head that is not a plain matrix (quantized, offloaded): every logit, then the tokens'
            full = head(normed)  # [..., batch, d_vocab]
            logits = full.gather(-1, tokens.to(full.device).expand(*full.shape[:-1], tokens.shape[-1]))
        logits = logits if a.logit_scale is None else logits * a.logit_scale
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # ---- hooks ------------------------------------------------------------------------------
    def _resolve(self, name: str | Callable[[str], bool]) -> list[str]:
        if callable(name):
            return [n for n in self.hook_names if name(n)]
        if name not in self._sites:
            raise unknown_name_error(name, self.hook_names)
        return [name]

    @contextmanager
    def hooks(self, fwd_hooks: Hooks = (), bwd_hooks: Hooks = ()) -> Iterator["HookedModel"]:
        """Attach hooks for the duration of the block. Names are checked before anything is attached;
        everything attached is removed when the block ends, by an exception or not."""
        plan = [
            (site_name, fn, backward)
            for hooks, backward in ((fwd_hooks, False), (bwd_hooks, True))
            for name, fn in hooks
            for site_name in self._resolve(name)
        ]
        if plan:
            self._check_modules()
        attached: list[Attachment] = []
        try:
            for site_name, fn, backward in plan:
                self._attach(site_name, fn, backward, attached)
            yield self
        finally:
            for att in reversed(attached):
                att.remove()

    def _attach(self, site_name: str, fn: HookFn, backward: bool, attached: list[Attachment]) -> None:
        """Attach one hook to one site; its Attachment goes into `attached` first, so that a failed
        attach is still removed."""
        site, layer = self._sites[site_name]
        att = Attachment()
        attached.append(att)
        site.attach(fn, HookPoint(site_name, layer), backward, att)

    def add_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: str = "fwd",
                 is_permanent: bool = False) -> None:
        """Attach a hook until `reset_hooks()` (TransformerLens's way; `with model.hooks(...)` removes
        its hooks by itself and is the safer one). `name` is a hook name or a filter on names; `dir`
        "fwd" or "bwd"; a permanent hook survives `reset_hooks()` unless `including_permanent`."""
        if dir not in ("fwd", "bwd"):
            raise InputError(f"dir is 'fwd' or 'bwd', not {dir!r}")
        names = self._resolve(name)
        self._check_modules()
        for site_name in names:
            pending: list[Attachment] = []
            try:
                self._attach(site_name, hook, dir == "bwd", pending)
            finally:  # even half attached, it is reset_hooks()'s to remove
                self._added += [(site_name, att, is_permanent) for att in pending]

    def reset_hooks(self, including_permanent: bool = False) -> None:
        """Remove the hooks `add_hook` attached (the permanent ones too with `including_permanent`)."""
        keep = []
        for name, att, permanent in self._added:
            if permanent and not including_permanent:
                keep.append((name, att, permanent))
            else:
                att.remove()
        self._added = keep

    def remove_all_hook_fns(self, including_permanent: bool = False) -> None:
        """TransformerLens's name for `reset_hooks`."""
        self.reset_hooks(including_permanent)

    def require_no_added_hooks(self, what: str) -> None:
        if self._added:
            names = sorted({name for name, _, _ in self._added})
            raise InputError(
                f"{what} runs the model as loaded, but hooks added with add_hook are attached ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}): they would act in some of its runs and not others. Call "
                "model.reset_hooks(including_permanent=True) first, or run it inside `with model.hooks(fwd_hooks=...)` "
                "if the edit is meant for every run.")

    def _check_modules(self) -> None:
        """Refuse to hook a model whose modules were replaced after wrapping (another library's
        wrappers, TransformerLens's bridge for one): the hooks would sit on modules it no longer runs."""
        now = dict(self.hf.named_modules())
        gone = [name for name, ident in self._modules.items() if name not in now or id(now[name]) != ident]
        if gone:
            raise UnsupportedModelError(
                f"{len(gone)} of this model's modules were replaced after mechscope wrapped it ({gone[0]} is now "
                f"{type(now[gone[0]]).__name__ if gone[0] in now else 'gone'}; another library's wrappers?): hooks "
                "would sit on modules the model no longer runs. Give each library its own copy of the model "
                "(copy.deepcopy(model.hf) before handing it over).")

    def run_with_hooks(
        self,
        tokens,
        *,
        fwd_hooks: Hooks = (),
        bwd_hooks: Hooks = (),
        attention_mask: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """One forward with hooks attached. With `bwd_hooks`, call `.backward()` on something computed
        from the returned logits: backward hooks stay armed on this forward's tensors until then, and
        fire only for that graph."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(tokens, attention_mask=attention_mask)

    def run_with_cache(
        self,
        tokens,
        *,
        names_filter: NamesFilter = None,
        attention_mask: Tensor | None = None,
        device: str | torch.device | None = None,
        stop_at_layer: int | None = None,
    ):
        """Forward once (in the caller's grad mode), returning (logits, ActivationCache of the
        selected sites, detached). With `stop_at_layer` (as in TransformerLens), the run ends at the
        residual stream entering that layer, which takes the place of the logits: the layers after
        it, the final norm and the unembedding never run (`n_layers`: every layer, no logits).

        With no filter every site is cached except the per-head ones of [batch, pos, head, d_model]
        (large): `attn.hook_result` (name it, or use `cache.stack_head_results()`, which computes it
        from z) and `hook_q_input|k_input|v_input` (resid_pre, once per head).
        """
        from mechscope.cache import ActivationCache

        names = self._select(names_filter)
        store: dict[str, Tensor] = {}

        def keep(act: Tensor, hook: HookPoint) -> None:
            store[hook.name] = act.detach().to(device) if device is not None else act.detach()

        with self.hooks(fwd_hooks=[(n, keep) for n in names]):
            logits = self(tokens, attention_mask=attention_mask, stop_at_layer=stop_at_layer)
        return logits, ActivationCache({n: store[n] for n in names if n in store}, self)

    def _select(self, names_filter: NamesFilter) -> list[str]:
        if names_filter is None:  # not the per-head copies: large, and computed for the hook
            return [n for n in self.hook_names if not n.endswith(_PER_HEAD_COPIES)]
        if isinstance(names_filter, str) or callable(names_filter):
            return self._resolve(names_filter)
        return [n for name in names_filter for n in self._resolve(name)]

    # ---- generation and controls --------------------------------------------------------------
    def generate(self, tokens, *, max_new_tokens: int, fwd_hooks: Hooks = (), do_sample: bool = False, **kwargs):
        """transformers' `generate` (KV cache included) with `fwd_hooks` applied at every step.

        Text in, text out (prompt and continuation; prompts of different lengths are padded on the
        left); token ids in, what `generate` returns. With no hooks it is exactly the plain call.
        Other keywords go to `generate` (temperature, top_k, ...). Hooks see the prompt in the first
        forward, then one position per step; interventions from `mechscope.probes` count positions
        from the prompt's first token in both (`models.generate.position_offset`)."""
        from mechscope.models.generate import generate

        return generate(self, tokens, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks, do_sample=do_sample,
                        **kwargs)

    def reinitialized(self, seed: int = 0) -> "HookedModel":
        """A copy with the same architecture and fresh random weights from the family's own
        initialization (the control for a probe: what can be read out of an untrained network)."""
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(seed)
            hf = type(self.hf)(self.hf.config).to(device=self.device, dtype=self.dtype)
        return HookedModel(hf, self.tokenizer)

    # ---- tokens -----------------------------------------------------------------------------
    def _encode(self, text: str | list[str], prepend_bos: bool | None) -> list[list[int]]:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; pass token ids instead of text")
        texts = [text] if isinstance(text, str) else list(text)
        ids = self.tokenizer(texts, add_special_tokens=True if prepend_bos is None else False)["input_ids"]
        if prepend_bos and self.tokenizer.bos_token_id is not None:
            ids = [[self.tokenizer.bos_token_id, *row] for row in ids]
        return ids

    def to_tokens(self, text: str | list[str], *, prepend_bos: bool | None = None) -> Int[Tensor, "batch pos"]:
        """Token ids, right-padded. `prepend_bos=None` keeps the tokenizer's own default (faithful
        to plain `transformers`); True forces a BOS token, False drops special tokens."""
        ids = self._encode(text, prepend_bos)
        width = max(len(row) for row in ids)
        pad = self.pad_token_id
        rows = [row + [pad] * (width - len(row)) for row in ids]
        return torch.tensor(rows, dtype=torch.long, device=self.device)  # long even when empty

    def last_positions(self, text: str | list[str], *, prepend_bos: bool | None = None) -> Int[Tensor, " batch"]:
        """Each prompt's last real position in `to_tokens(text)`."""
        return torch.tensor([len(row) - 1 for row in self._encode(text, prepend_bos)], device=self.device)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
            if candidate is not None:
                return candidate
        return 0

    def to_str_tokens(self, text: str | Tensor | list[int], *, prepend_bos: bool | None = None) -> list:
        """The tokens of one prompt, or one row of ids, as strings; a [batch, pos] tensor gives one
        list per row (as TransformerLens does)."""
        if isinstance(text, str):
            ids = self._encode(text, prepend_bos)[0]
        else:
            ids = torch.as_tensor(text)
            if ids.ndim == 2:
                return [self.to_str_tokens(row) for row in ids]
            if ids.ndim > 2:
                raise InputError(f"to_str_tokens takes a prompt, a row of ids or a [batch, pos] tensor, not a "
                                 f"{ids.ndim}-dimensional tensor")
            ids = ids.flatten().tolist()
        return [self.tokenizer.decode([i]) for i in ids]

    def to_single_token(self, text: str) -> int:
        ids = self._encode(text, prepend_bos=False)[0]
        if len(ids) != 1:
            raise InputError(f"{text!r} is {len(ids)} tokens {self.to_str_tokens(ids)}; a single token is needed")
        return ids[0]

    def tokens_to_residual_directions(self, tokens: str | int | Tensor) -> Float[Tensor, "*shape d_model"]:
        """The unembedding direction of each token, W_U[:, token]: [d_model] for a string (one token)
        or an id, [*shape, d_model] for a tensor of ids. (The model's own W_U: see
        `ActivationCache.apply_ln_to_stack`, which applies the final norm's weight.)"""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, device=self.W_U.device)
        if ids.is_floating_point() or ((ids < 0) | (ids >= self.cfg.d_vocab)).any():
            raise InputError(f"tokens must be ids in 0..{self.cfg.d_vocab - 1}")
        return self.W_U.T[ids]


class _Stopped(Exception):
    """Ends a forward at `stop_at_layer`."""


def next_token_loss(logits: Tensor, tokens: Tensor, attention_mask: Tensor | None = None, *,
                    per_token: bool = False) -> Tensor:
    """Cross-entropy of each next token, [batch, pos - 1], or its mean over real tokens (a target is
    real where `attention_mask` is 1; all are without one), as TransformerLens's loss."""
    logp = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # [batch, pos - 1, d_vocab]
    per = -logp.gather(-1, tokens[:, 1:, None])[..., 0]  # [batch, pos - 1]
    if per_token:
        return per
    real = torch.ones_like(per) if attention_mask is None else attention_mask[:, 1:].to(per)
    return (per * real).sum() / real.sum()
