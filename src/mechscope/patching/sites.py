"""What can be patched: each site is a hook name and where its heads and positions sit.

Shapes without the batch axis: resid/attn_out/mlp_out [pos, d_model]; head_q/k/v/z [pos, head,
d_head] (k and v per key/value head); head_result [pos, head, d_model]; head_pattern [head, q_pos,
k_pos] (its position is the query's).
"""

from __future__ import annotations

from dataclasses import dataclass

from mechscope.errors import InputError


@dataclass(frozen=True)
class PatchSite:
    name: str
    hook: str  # with {} for the layer
    head_dim: int | None  # axis of heads in the activation without batch; None: one component per layer
    pos_dim: int
    kv: bool = False  # heads are key/value heads (grouped-query attention)

    def hook_name(self, layer: int) -> str:
        return self.hook.format(layer)

    @property
    def per_head(self) -> bool:
        return self.head_dim is not None


SITES: dict[str, PatchSite] = {
    s.name: s
    for s in (
        PatchSite("resid_pre", "blocks.{}.hook_resid_pre", None, 0),
        PatchSite("resid_mid", "blocks.{}.hook_resid_mid", None, 0),
        PatchSite("resid_post", "blocks.{}.hook_resid_post", None, 0),
        PatchSite("attn_out", "blocks.{}.hook_attn_out", None, 0),
        PatchSite("mlp_out", "blocks.{}.hook_mlp_out", None, 0),
        PatchSite("head_z", "blocks.{}.attn.hook_z", 1, 0),
        PatchSite("head_q", "blocks.{}.attn.hook_q", 1, 0),
        PatchSite("head_k", "blocks.{}.attn.hook_k", 1, 0, kv=True),
        PatchSite("head_v", "blocks.{}.attn.hook_v", 1, 0, kv=True),
        PatchSite("head_pattern", "blocks.{}.attn.hook_pattern", 0, 1),
        PatchSite("head_result", "blocks.{}.attn.hook_result", 1, 0),
    )
}


def patch_site(name: str) -> PatchSite:
    if name not in SITES:
        raise InputError(f"unknown patching site {name!r}; choose one of {', '.join(SITES)}")
    return SITES[name]
