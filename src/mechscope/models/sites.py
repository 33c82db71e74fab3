"""Hook sites: every TransformerLens hook name of a wrapped model, and how to attach a hook to it.

A hook function is `fn(activation, hook) -> activation | None`, as in TransformerLens: returning a
tensor replaces the activation, returning None leaves the model's own computation untouched (so an
inert hook changes no bit of the output). A backward hook gets the gradient of the activation and
may return a replacement gradient.

Most sites are one module and a lens (`ModuleSite`). Some need more than that:
- `blocks.{l}.hook_resid_mid` lives between two modules (`ResidMidSite`);
- `blocks.{l}.hook_q_input|k_input|v_input` are per-head copies of the norm's input, each written
  copy recomputed through the norm and the projection (`HeadInputSite`);
- `blocks.{l}.attn.hook_result` is computed from `hook_z` only when hooked (`ResultSite`);
- `blocks.{l}.attn.hook_pattern`, `hook_attn_scores` and `hook_rot_q|k` live inside attention
  (`models/attention.py`);
- `ln_final.hook_scale` is recomputed from the final norm's input (`ScaleSite`).
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from mechscope.errors import HookNameError
from mechscope.models.adapters.base import Adapter, Place, at_input, norm_apply, norm_scale
from mechscope.models.lens import FIRST, IN, Lens, heads

if TYPE_CHECKING:
    from mechscope.models.attention import AttentionSwitch

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


@dataclass
class HookPoint:
    """The second argument of a hook function (TransformerLens's `hook`)."""

    name: str
    layer: int | None = None
    ctx: dict = field(default_factory=dict)


class Attachment:
    """One hook function attached to one site; `remove()` takes it off every module.

    A backward hook lives on the tensors of the forwards run while it was attached, so it fires
    in their backward pass even after removal, and in no other graph.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], Any]] = []

    def on_remove(self, undo: Callable[[], Any]) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def _run(fn: HookFn, point: HookPoint, act: torch.Tensor, backward: bool):
    """Call a forward hook, or hang a backward hook on `act`. Returns the activation to write back,
    or None when the model's own value stands.

    One rule for every site, as in TransformerLens: a hook that edits its activation in place and
    returns None has returned the edited tensor. (Some sites hand the hook a tensor computed for it,
    such as `hook_result`, `hook_resid_mid`, `hook_scale` and the pattern; an in-place edit there
    would otherwise change nothing.) PyTorch's version counter tells an edit from none, so a hook
    that only reads still leaves the model's computation untouched, bit for bit."""
    if backward:
        if not (torch.is_grad_enabled() and act.requires_grad):
            return None
        act = act.view_as(act)  # a node of our own, through which the gradient flows
        act.register_hook(lambda grad: fn(grad, point))
        return act
    version = act._version
    new = fn(act, point)
    if new is None:
        if act._version == version:
            return None
        new = act  # edited in place
    if not isinstance(new, torch.Tensor) or new.shape != act.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(
            f"hook on {point.name!r} returned {got}; it must return None or a tensor of the "
            f"activation's shape {tuple(act.shape)}"
        )
    if new.dtype != act.dtype and (new.dtype, act.dtype) not in _CAST_WARNED:
        _CAST_WARNED.add((new.dtype, act.dtype))
        warnings.warn(f"a hook on {point.name!r} returned {new.dtype}; the model runs in {act.dtype}, so it is "
                      f"cast to {act.dtype} (said once per pair of dtypes)", stacklevel=2)
    return new.to(dtype=act.dtype, device=act.device)


_CAST_WARNED: set[tuple[torch.dtype, torch.dtype]] = set()


def _forward_hook(att: Attachment, module: nn.Module, hook: Callable) -> None:
    att.on_remove(module.register_forward_hook(hook).remove)


def _pre_hook(att: Attachment, module: nn.Module, hook: Callable) -> None:
    att.on_remove(module.register_forward_pre_hook(hook, with_kwargs=True).remove)


@dataclass(frozen=True)
class ModuleSite:
    """An activation read through a lens from one module's output (or input)."""

    module: nn.Module
    lens: Lens
    on_input: bool = False

    def attach(self, fn: HookFn, point: HookPoint, backward: bool, att: Attachment) -> None:
        def apply(value):
            new = _run(fn, point, self.lens.get(value), backward)
            return None if new is None else self.lens.put(value, new)

        if self.on_input:
            _pre_hook(att, self.module, lambda m, args, kwargs: apply((args, kwargs)))
        else:
            _forward_hook(att, self.module, lambda m, args, out: apply(out))


@dataclass(frozen=True)
class ResidMidSite:
    """resid_pre + attn_out, read where the MLP's norm (or the MLP) takes it: after every edit to what
    attention added, whatever order the hooks were attached in. That tensor is also what the layer
    adds the MLP's output to, so a written value is copied into it: the MLP and the residual stream
    both carry it exactly. A backward hook sees its whole gradient (through the MLP and around it)."""

    reader: nn.Module  # the MLP's norm, or the MLP where no norm comes first (OLMo-2)

    def attach(self, fn: HookFn, point: HookPoint, backward: bool, att: Attachment) -> None:
        def on_reader(m, args, kwargs):
            mid = IN.get((args, kwargs))  # [batch, pos, d_model] (OPT's is flattened: FlatSite shows it whole)
            if backward:
                if torch.is_grad_enabled() and mid.requires_grad:
                    mid.register_hook(lambda grad: fn(grad, point))
                return None
            new = _run(fn, point, mid.clone(), backward)  # a copy: in-place edits act
            if new is not None:
                mid.copy_(new)  # the very tensor the residual stream goes on with
            return None

        _pre_hook(att, self.reader, on_reader)


@dataclass(frozen=True)
class FlatSite:
    """A site whose module sees the stream flattened to [batch * pos, ...] (OPT's MLP and its norm):
    hooks see [batch, pos, ...] as everywhere else (the layer's input says the shape), and what they
    write is flattened back."""

    layer: nn.Module
    site: Any  # the site on the flattened module

    def attach(self, fn: HookFn, point: HookPoint, backward: bool, att: Attachment) -> None:
        lead: dict[str, torch.Size] = {}

        def on_layer(m, args, kwargs):
            lead["shape"] = IN.get((args, kwargs)).shape[:-1]  # [batch, pos]

        def unflattened(act, point):  # act [batch * pos, ...] (a gradient, for backward hooks)
            new = fn(act.view(*lead["shape"], *act.shape[1:]), point)  # a view: in-place edits act
            return None if new is None else new.reshape(act.shape)

        _pre_hook(att, self.layer, on_layer)
        self.site.attach(unflattened, point, backward, att)


@dataclass(frozen=True)
class ResultSite:
    """Per-head output in the residual stream, [batch, pos, head, d_model], from the output
    projection's input. Written results replace the attention output by their sum (plus bias)."""

    adapter: Adapter
    layer: int

    def attach(self, fn: HookFn, point: HookPoint, backward: bool, att: Attachment) -> None:
        a, layer = self.adapter, self.layer
        proj = a.module(a.out_proj, layer)

        def write(result: torch.Tensor):
            new = _run(fn, point, result, backward)
            if new is None:
                return None
            out = a.attn_out_from_results(layer, new)  # what is added; the projection's output is that
            return out if a.residual_multiplier is None else out / a.residual_multiplier  # before Granite's factor

        if a.attn_post_norm is None:
            _forward_hook(att, proj, lambda m, args, out: write(a.head_results(layer, args[0])))
            return
        stash: dict[str, torch.Tensor] = {}

        def grab_z(m, args, out):
            stash["z"] = args[0]

        def on_post_norm(m, args, out):
            return write(a.head_results(layer, stash.pop("z"), proj_out=args[0]))

        _forward_hook(att, proj, grab_z)
        _forward_hook(att, a.module(a.attn_post_norm, layer), on_post_norm)


@dataclass(frozen=True)
class HeadInputSite:
    """TransformerLens's `hook_q_input|k_input|v_input`: each head's own copy of the stream its query
    (key, value) reads, [batch, pos, head, d_model] (k and v per key/value head), before the attention
    norm. Read, it is resid_pre repeated; written, each head's q (k, v) is computed from its own copy
    through the attention norm and the projection (the model's own modules), and nothing else moves.
    Where a q/k norm spans all heads (OLMo-2, OLMoE), each copy goes through it too, and the site
    writes that norm's output."""

    reader: nn.Module  # the attention norm (or attention itself, where no norm comes first): its input is resid_pre
    norm: Callable[[torch.Tensor], torch.Tensor]  # that norm's forward (the identity where there is none)
    proj: nn.Module  # the projection whose output holds this kind's heads
    lens: Lens  # projection output -> [batch, pos, head, d_head]
    n_heads: int
    whole_norm: nn.Module | None = None  # a q/k norm over all heads' projections, applied after `proj`

    def attach(self, fn: HookFn, point: HookPoint, backward: bool, att: Attachment) -> None:
        stash: dict[str, torch.Tensor] = {}

        def grab(m, args, kwargs):
            stash["x"] = IN.get((args, kwargs))  # [batch, pos, d_model]

        def on_proj(m, args, out):
            x = stash.pop("x")
            copies = x[:, :, None].expand(-1, -1, self.n_heads, -1)  # [batch, pos, head, d_model]
            new = _run(fn, point, copies if backward else copies.clone(), backward)  # a copy: in-place edits act
            if new is None:
                return None
            b, p, h, d = new.shape
            per_head = new.permute(2, 0, 1, 3).reshape(h * b, p, d)  # every head's copy as a prompt
            projected = self.proj.forward(self.norm(per_head))  # [head * batch, pos, head * d_head]
            if self.whole_norm is not None:
                projected = self.whole_norm.forward(projected)
            heads = self.lens.get(projected)  # [head * batch, pos, head, d_head]
            own = heads.view(h, b, p, h, -1).diagonal(dim1=0, dim2=3)  # [batch, pos, d_head, head]
            return self.lens.put(out, own.permute(0, 1, 3, 2))  # head h's q from head h's copy

        _pre_hook(att, self.reader, grab)
        _forward_hook(att, self.proj if self.whole_norm is None else self.whole_norm, on_proj)


@dataclass(frozen=True)
class ScaleSite:
    """The final norm's divisor, [batch, pos, 1]; a written scale is applied in its place."""

    norm: nn.Module
    kind: str

    def attach(self, fn: HookFn, point: HookPoint, backward: bool, att: Attachment) -> None:
        def on_norm(m, args, out):
            x = args[0]  # [batch, pos, d_model]
            new = _run(fn, point, norm_scale(self.kind, self.norm, x), backward)
            return None if new is None else norm_apply(self.kind, self.norm, x, new)

        _forward_hook(att, self.norm, on_norm)


@dataclass(frozen=True)
class PosEmbedSite:
    """Learned position embeddings as TransformerLens gives them, [batch, pos, d_model]: the module
    makes [1, pos, d_model] (the same for every prompt); the hook sees it per prompt, and a written
    tensor is added per prompt (the model adds it to the token embeddings, which broadcasts)."""

    embed: nn.Module  # the token embedding, run first: it says the batch size
    pos_embed: nn.Module

    def attach(self, fn: HookFn, point: HookPoint, backward: bool, att: Attachment) -> None:
        batch: dict[str, int] = {}

        def on_embed(m, args, out):
            batch["n"] = out.shape[0]

        def on_pos(m, args, out):  # [1 or batch, pos, d_model]
            act = out.expand(batch["n"], *out.shape[1:])
            return _run(fn, point, act if backward else act.clone(), backward)  # a copy: in-place edits act

        _forward_hook(att, self.embed, on_embed)
        _forward_hook(att, self.pos_embed, on_pos)


@dataclass(frozen=True)
class RouterSite:
    """A mixture-of-experts layer's routing, [batch, pos, expert]: each token's weight on each expert
    (the router's top-k weights, 0 on the experts it did not pick). A written tensor routes each token
    to its own top-k entries with those weights: zeroing an expert's weight ablates it."""

    block: nn.Module  # the MoE block (its input says [batch, pos]; the router sees tokens flattened)
    router: nn.Module  # -> (logits [token, expert], weights [token, k], experts [token, k])
    n_experts: int

    def attach(self, fn: HookFn, point: HookPoint, backward: bool, att: Attachment) -> None:
        shape: dict[str, torch.Size] = {}

        def on_block(m, args, kwargs):
            shape["lead"] = (args[0] if args else kwargs["hidden_states"]).shape[:-1]  # [batch, pos]

        def on_router(m, args, out):
            logits, weights, experts = out
            dense = weights.new_zeros(weights.shape[0], self.n_experts).scatter(1, experts, weights)  # [token, expert]
            new = _run(fn, point, dense.view(*shape["lead"], self.n_experts), backward)  # [batch, pos, expert]
            if new is None:
                return None
            flat = new.reshape(-1, self.n_experts)  # [token, expert]
            if backward:  # same experts; the weights flow through the hooked tensor
                return logits, flat.gather(1, experts), experts
            top = flat.topk(experts.shape[1], dim=-1)
            return logits, top.values.to(weights.dtype), top.indices

        _pre_hook(att, self.block, on_block)
        _forward_hook(att, self.router, on_router)


LOGITS = Lens(get=lambda out: out.logits, put=lambda out, a: out.__setitem__("logits", a) or out)


def build_sites(adapter: Adapter, switch: "AttentionSwitch") -> dict[str, tuple[Any, int | None]]:
    """Every hook name of the model -> (site, layer)."""
    from mechscope.models.attention import EagerSite, InlineSwitch, MethodSwitch, RotarySite  # (it imports this module)

    a, cfg = adapter, adapter.cfg

    def place(p: Place, layer: int | None = None) -> ModuleSite:
        return ModuleSite(a.module(p.path, layer), p.lens, p.on_input)

    def mlp_site(site, l: int):  # the MLP's sites, shown as [batch, pos, ...] where it runs flattened (OPT)
        return FlatSite(a.layer_modules()[l], site) if a.mlp_flat else site

    sites: dict[str, tuple[Any, int | None]] = {"hook_embed": (place(Place(a.embed_site or a.embed, a.embed_lens)),
                                                               None)}
    if a.pos_embed is not None:
        sites["hook_pos_embed"] = (PosEmbedSite(a.module(a.embed), a.module(a.pos_embed)), None)
    for l, layer in enumerate(a.layer_modules()):
        b = f"blocks.{l}."
        attn_out = place(a.attn_out, l)
        sites[b + "hook_resid_pre"] = (ModuleSite(layer, IN, on_input=True), l)
        for name, qkv in a.qkv().items():
            sites[b + f"attn.hook_{name}"] = (place(qkv, l), l)
        attn_switch = switch if a.attn_method is None else MethodSwitch(a.module(a.attn, l), a.attn_method)
        if a.attn_inline is not None:
            attn_switch = InlineSwitch(a.module(a.attn, l), switch if a.attn_inline == "eager" else None,
                                       cfg.n_kv_heads)
        if a.rotary:
            for which in "qk":
                rot_switch = attn_switch if a.attn_inline is not None else switch
                sites[b + f"attn.hook_rot_{which}"] = (RotarySite(a.module(a.attn, l), rot_switch, which), l)
        for name, (proj, post) in a.qkv_projections().items():
            n_heads = cfg.n_heads if name == "q" else cfg.n_kv_heads
            whole = a.module(post, l) if post is not None and a.qk_norm_whole else None
            sites[b + f"hook_{name}_input"] = (HeadInputSite(a.reader(l), a.pre_norm(l), a.module(proj.path, l),
                                                             proj.lens, n_heads, whole), l)
        sites[b + "attn.hook_attn_scores"] = (EagerSite(a.module(a.attn, l), attn_switch, "scores"), l)
        sites[b + "attn.hook_pattern"] = (EagerSite(a.module(a.attn, l), attn_switch, "pattern"), l)
        sites[b + "attn.hook_z"] = (place(at_input(a.out_proj, heads(cfg.d_head)), l), l)
        sites[b + "attn.hook_result"] = (ResultSite(a, l), l)
        sites[b + "hook_attn_out"] = (attn_out, l)
        if not cfg.parallel_residual:
            sites[b + "hook_resid_mid"] = (mlp_site(ResidMidSite(a.reader(l, mlp=True)), l), l)
        if a.attn_norm is not None:  # (OLMo-2 has no norm before attention or the MLP)
            sites[b + "ln1.hook_scale"] = (ScaleSite(a.module(a.attn_norm, l), a.norm_kind), l)
        if a.mlp_norm not in (None, a.attn_norm):  # (GPT-J and Phi: attention and MLP read one norm)
            sites[b + "ln2.hook_scale"] = (mlp_site(ScaleSite(a.module(a.mlp_norm, l), a.norm_kind), l), l)
        if a.is_moe(l):  # experts run fused inside the block: its routing is the site
            sites[b + "mlp.hook_router"] = (RouterSite(a.module(a.moe_block, l), a.module(a.router, l),
                                                       a.n_experts()), l)
        else:
            if a.mlp_pre is not None:
                sites[b + "mlp.hook_pre"] = (mlp_site(place(a.mlp_pre, l), l), l)
            if a.mlp_pre_linear is not None:
                sites[b + "mlp.hook_pre_linear"] = (mlp_site(place(a.mlp_pre_linear, l), l), l)
            sites[b + "mlp.hook_post"] = (mlp_site(place(at_input(a.down_proj), l), l), l)
        sites[b + "hook_mlp_out"] = (mlp_site(place(a.mlp_out, l), l), l)
        sites[b + "hook_resid_post"] = (ModuleSite(layer, FIRST), l)
    sites["ln_final.hook_scale"] = (ScaleSite(a.module(a.final_norm), a.norm_kind), None)
    sites["hook_logits"] = (ModuleSite(a.hf, LOGITS), None)
    return sites


def unknown_name_error(name: str, names: list[str]) -> HookNameError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    examples = ", ".join(n for n in names if n.startswith("blocks.0.") or not n.startswith("blocks."))
    return HookNameError(
        f"unknown hook name {name!r}.{hint} This model's sites are {examples}, "
        "and the same for every layer (blocks.{l}....)."
    )
