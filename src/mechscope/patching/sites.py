"""What can be patched: each site is a hook name and where its heads and positions sit.

Shapes without the batch axis: resid/attn_out/mlp_out [pos, d_model]; head_q/k/v/z [pos, head,
d_head] (k and v per key/value head); head_result [pos, head, d_model]; head_pattern [head, q_pos,
k_pos] (its position is the query's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel
    from mechscope.tasks.batch import ContrastiveBatch


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

    def n_heads(self, model: "HookedModel") -> int:
        return model.cfg.n_kv_heads if self.kv else model.cfg.n_heads

    def components(self, model: "HookedModel", layers: Sequence[int] | None, heads: Sequence[int] | None):
        """The layers and heads to patch, checked ([None] for heads on a layer-level site)."""
        layers = _check_indices("layer", layers, model.cfg.n_layers)
        if heads is not None and not self.per_head:
            raise InputError(f"site {self.name!r} has no heads; leave `heads` out")
        return layers, (_check_indices("head", heads, self.n_heads(model)) if self.per_head else [None])

    def axes(self, model: "HookedModel", batch: "ContrastiveBatch", layers: list[int], heads: list, per_position: bool):
        """A result's axis names and labels."""
        axes = ("layer",) + (("head",) if self.per_head else ()) + (("pos",) if per_position else ())
        labels = {"layer": [str(layer) for layer in layers]}
        if self.per_head:
            labels["head"] = [str(h) for h in heads]
        if per_position:
            labels["pos"] = _position_labels(model, batch)
        return axes, labels


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


# TransformerLens's names for the same sites (its get_act_patch_* functions and hook names).
TL_NAMES = {"z": "head_z", "q": "head_q", "k": "head_k", "v": "head_v", "pattern": "head_pattern",
            "result": "head_result", "attn_out": "attn_out", "mlp_out": "mlp_out"}


def resolve_site(name: str) -> tuple[PatchSite, int | None]:
    """A site named as mechscope names it ("head_z"), as TransformerLens's patching does ("z",
    "resid_pre"), or by a hook name ("blocks.3.attn.hook_z": that site, and layer 3)."""
    if name in SITES:
        return SITES[name], None
    if name in TL_NAMES:
        return SITES[TL_NAMES[name]], None
    for site in SITES.values():
        prefix, suffix = site.hook.split("{}")
        if name.startswith(prefix) and name.endswith(suffix) and name[len(prefix):-len(suffix)].isdigit():
            return site, int(name[len(prefix):-len(suffix)])
    raise InputError(f"unknown patching site {name!r}; choose one of {', '.join(SITES)} (or TransformerLens's "
                     f"{', '.join(n for n in TL_NAMES if n not in SITES)}, or a hook name such as blocks.0.attn.hook_z)")


def patch_site(name: str) -> PatchSite:
    return resolve_site(name)[0]


def _check_indices(what: str, given: Sequence[int] | None, n: int) -> list[int]:
    """The indices asked for (all if None); negative ones count from the end, as in Python."""
    if given is None:
        return list(range(n))
    given = [int(i) for i in given]
    bad = [i for i in given if not -n <= i < n]
    if bad or not given:
        raise InputError(f"{what}s {bad or given} are out of range; this model has {what}s 0 .. {n - 1} "
                         f"(or -{n} .. -1 from the end)")
    return [i % n for i in given]


def _position_labels(model: "HookedModel", batch: "ContrastiveBatch") -> list[str]:
    if batch.equal_lengths:
        return [f"{i}:{tok}" for i, tok in enumerate(model.to_str_tokens(batch.clean[0]))]
    return [str(i) for i in range(batch.clean.shape[1])]
