"""Interventions along directions, as ordinary hooks: each returns a `(hook name, hook function)`
pair for `run_with_hooks(fwd_hooks=[...])`, `model.hooks([...])` and `model.generate(fwd_hooks=[...])`.

    model.run_with_hooks(tokens, fwd_hooks=[steer("blocks.3.hook_resid_post", probe.directions[4], 8.0)])

The activation's last axis is the direction's space (d_model for the residual stream, d_head for
`hook_q|k|v|z` with `head=`); positions index its second axis and count from the prompt's first
token, also during generation. With u the unit direction (or an orthonormal basis U of a subspace):
- `steer`: x + alpha u (the coordinate x.u grows by alpha);
- `ablate_direction`: x - (x.u) u (projected out; for a basis, the whole subspace);
- `clamp`: x + (value - x.u) u (the coordinate set to value);
- `interchange`: x - U U^T x + U U^T s (the subspace's part replaced by its value s on another
  input, e.g. `cache[site]` of a source prompt).
`random_subspace` gives the placebo: the same intervention in a random subspace of equal size.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.models.generate import position_offset
from mechscope.models.sites import HookFn, HookPoint

Positions = int | Sequence[int] | None


def steer(site: str, direction: Float[Tensor, " d"], alpha: float, *, positions: Positions = None,
          head: int | None = None) -> tuple[str, HookFn]:
    """Add alpha times the unit `direction` at `positions` (every position when None)."""
    u = _basis(direction)[0]

    def edit(x: Tensor) -> Tensor:  # [..., d]
        return x + alpha * u.to(x)

    return site, _at_positions(site, edit, positions, head, u.shape[0])


def ablate_direction(site: str, direction: Float[Tensor, "... d"], *, positions: Positions = None,
                     head: int | None = None) -> tuple[str, HookFn]:
    """Project out a direction [d] (or the subspace spanned by the rows of [k, d])."""
    U = _basis(direction)  # [k, d], orthonormal rows

    def edit(x: Tensor) -> Tensor:
        Ux = U.to(x)
        return x - (x @ Ux.T) @ Ux

    return site, _at_positions(site, edit, positions, head, U.shape[1])


def clamp(site: str, direction: Float[Tensor, " d"], value: float, *, positions: Positions = None,
          head: int | None = None) -> tuple[str, HookFn]:
    """Set the coordinate along the unit `direction` to `value`, leaving the rest of x as it was."""
    u = _basis(direction)[0]

    def edit(x: Tensor) -> Tensor:
        ux = u.to(x)
        return x + (value - x @ ux)[..., None] * ux

    return site, _at_positions(site, edit, positions, head, u.shape[0])


def interchange(site: str, basis: Float[Tensor, "... d"], source: Tensor, *, positions: Positions = None,
                head: int | None = None) -> tuple[str, HookFn]:
    """Replace the part of the activation in the subspace spanned by `basis` ([d] or [k, d]) with
    that part of `source`, the same site's activation on another input (same shape as the hooked
    one: [batch, pos, ...])."""
    U = _basis(basis)
    source = torch.as_tensor(source)

    def edit(x: Tensor, src: Tensor) -> Tensor:
        Ux = U.to(x)
        return x + ((src.to(x) - x) @ Ux.T) @ Ux

    return site, _at_positions(site, edit, positions, head, U.shape[1], source=source)


def random_subspace(d: int, k: int = 1, *, seed: int = 0) -> Float[Tensor, "k d"]:
    """k orthonormal random directions in d dimensions: the placebo for an intervention in a k-dim
    subspace."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))  # [d, k]
    return q.T.contiguous()


def _basis(direction) -> Tensor:
    """Orthonormal rows spanning `direction` ([d] or [k, d]), in float64."""
    v = torch.as_tensor(direction).detach().to("cpu", torch.float64)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise InputError(f"a direction is a vector [d] or a basis [k, d]; got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise InputError("the direction has NaN or infinite entries")
    q, r = torch.linalg.qr(v.T)  # q [d, k]
    if (r.diagonal().abs() <= 1e-10 * v.norm(dim=1).max()).any():
        raise InputError("the direction is zero, or the basis rows are linearly dependent")
    return (q * r.diagonal().sign()).T.contiguous()  # signs kept: row 0 points along direction[0]


def _at_positions(site: str, edit, positions: Positions, head: int | None, d: int,
                  source: Tensor | None = None) -> HookFn:
    if site.endswith(("hook_pattern", "hook_attn_scores")):
        raise InputError(f"{site}: attention patterns and scores have no direction space; intervene on the residual "
                         "stream, an attention or MLP output, or hook_q|k|v|z with head=")
    wanted = None if positions is None else torch.as_tensor(positions, dtype=torch.long).flatten()
    if wanted is not None and (wanted < 0).any():
        raise InputError(f"positions count from the prompt's first token (0, 1, ...); got {wanted.tolist()}")

    def fn(act: Tensor, hook: HookPoint) -> Tensor:
        if act.shape[-1] != d:
            raise InputError(f"{hook.name} has activations of width {act.shape[-1]}; the direction has {d}")
        if act.ndim == 4 and head is None:
            raise InputError(f"{hook.name} has one vector per head [batch, pos, head, d_head]: say which with head=")
        index = (slice(None), slice(None)) + ((head,) if act.ndim == 4 else ())
        view = act[index]  # [batch, pos, d]
        src = None
        if source is not None:
            src = source[index] if source.ndim == act.ndim else source
            if src.shape[0] != view.shape[0] or src.shape[-1] != d:
                raise InputError(f"the source activations {tuple(source.shape)} do not match {hook.name}'s "
                                 f"{tuple(act.shape)}")
        offset = position_offset()
        if wanted is None:
            lo, hi = offset, offset + view.shape[1]
            if src is not None:
                src = src[:, lo:hi]
            new = edit(view, src) if src is not None else edit(view)
        else:
            local = wanted - offset  # positions inside this forward
            local = local[(local >= 0) & (local < view.shape[1])].to(act.device)
            if local.numel() == 0:
                return act
            new = view.clone()
            part = view[:, local]
            new[:, local] = edit(part, src[:, (local + offset).to(src.device)]) if src is not None else edit(part)
        out = act.clone()
        out[index] = new
        return out

    return fn
