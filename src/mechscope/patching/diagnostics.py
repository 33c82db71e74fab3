"""How far to trust an estimate: agreement with exact patching, and exact checks of what it ranks first."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mechscope.patching.exact import activation_patch
from mechscope.patching.result import PatchResult


@dataclass(frozen=True)
class Agreement:
    pearson: float
    spearman: float
    sign_agreement: float  # among components whose exact effect is not negligible
    top_k_overlap: float  # |top-k(estimate) & top-k(exact)| / k, by |effect|
    k: int
    worst: list[dict]  # the components whose estimate misses most: labels, estimate, exact

    def __str__(self) -> str:
        def r(x: float) -> str:  # a correlation with a constant is undefined, not a number
            return f"{x:.3f}" if x == x else "undefined (one side is constant)"

        return (f"pearson {r(self.pearson)}, spearman {r(self.spearman)}, sign agreement "
                f"{self.sign_agreement:.2f}, top-{self.k} overlap {self.top_k_overlap:.2f}")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denominator) if denominator > 0 else float("nan")


def compare(estimate: PatchResult, exact: PatchResult, *, k: int = 10, worst: int = 5) -> Agreement:
    """Agreement of an estimate (e.g. AtP) with exact patching of the same site, cell by cell."""
    if estimate.axes != exact.axes or estimate.values.shape != exact.values.shape:
        raise ValueError(f"results differ in shape: {estimate.axes} {tuple(estimate.values.shape)} vs "
                         f"{exact.axes} {tuple(exact.values.shape)}")
    e, x = estimate.values.flatten(), exact.values.flatten()
    k = min(k, e.numel())
    big = x.abs() > 1e-3 * x.abs().max()
    sign = (torch.sign(e[big]) == torch.sign(x[big])).double().mean().item() if big.any() else 1.0
    top_e = set(e.abs().argsort(descending=True)[:k].tolist())
    top_x = set(x.abs().argsort(descending=True)[:k].tolist())
    misses = []
    for i in (e - x).abs().argsort(descending=True)[:worst].tolist():
        index = torch.unravel_index(torch.tensor(i), exact.values.shape)
        labels = {a: exact.labels[a][int(j)] for a, j in zip(exact.axes, index)}
        misses.append({"component": labels, "estimate": e[i].item(), "exact": x[i].item()})
    return Agreement(
        pearson=_pearson(e, x), spearman=_pearson(_ranks(e), _ranks(x)), sign_agreement=sign,
        top_k_overlap=len(top_e & top_x) / k, k=k, worst=misses,
    )


@dataclass(frozen=True)
class Verification:
    """Exact effects of the top-k estimated components and of a random sample of the rest."""

    top: list[dict]  # component labels, estimate, exact
    sample: list[dict]
    max_missed: float  # largest |exact effect| in the sample: what the ranking may have missed

    def __str__(self) -> str:
        return (f"top {len(self.top)}: exact |effect| {min(abs(t['exact']) for t in self.top):.3f} .. "
                f"{max(abs(t['exact']) for t in self.top):.3f}; largest |effect| among {len(self.sample)} "
                f"sampled others: {self.max_missed:.3f}")


def verify_top_k(model, batch, estimate: PatchResult, k: int, *, sample: int | None = None, seed: int = 0) -> Verification:
    """Run exact patching on the k components the estimate ranks first (by GradDrop's score where the
    estimate has one, else by |value|) and on a random sample of the others (default: k of them), to
    bound what the ranking missed, as AtP* describes."""
    scores = torch.tensor(estimate.extra["graddrop"]) if "graddrop" in estimate.extra else estimate.values.abs()
    order = scores.flatten().argsort(descending=True).tolist()
    top, rest = order[:k], order[k:]
    picked = random.Random(seed).sample(rest, min(sample if sample is not None else k, len(rest)))
    shape, axes = estimate.values.shape, estimate.axes
    index = {i: [int(j) for j in torch.unravel_index(torch.tensor(i), shape)] for i in top + picked}
    exact = _exact_at(model, batch, estimate, [index[i] for i in top + picked])
    rows = []
    for i in top + picked:
        labels = {a: estimate.labels[a][j] for a, j in zip(axes, index[i])}
        rows.append({"component": labels, "estimate": estimate.values.flatten()[i].item(), "exact": exact[tuple(index[i])]})
    top_rows, sample_rows = rows[:len(top)], rows[len(top):]
    return Verification(top=top_rows, sample=sample_rows,
                        max_missed=max((abs(r["exact"]) for r in sample_rows), default=0.0))


def _exact_at(model, batch, estimate: PatchResult, indices: list[list[int]]) -> dict[tuple, float]:
    """Exact effects at the given cells, one engine call per layer (for the heads asked there)."""
    per_position = "pos" in estimate.axes
    by_layer: dict[int, set] = {}
    for idx in indices:
        by_layer.setdefault(idx[0], set()).add(idx[1] if "head" in estimate.axes else None)
    out = {}
    for li, heads in by_layer.items():
        layer = int(estimate.labels["layer"][li])
        head_ids = sorted(int(estimate.labels["head"][h]) for h in heads) if "head" in estimate.axes else None
        result = activation_patch(model, batch, site=estimate.site, per_position=per_position, layers=[layer],
                                  heads=head_ids, direction=estimate.direction, metric=estimate.metric)
        for idx in indices:
            if idx[0] != li:
                continue
            cell = [0]
            if "head" in estimate.axes:
                cell.append(head_ids.index(int(estimate.labels["head"][idx[1]])))
            if per_position:
                cell.append(idx[-1])
            out[tuple(idx)] = result.values[tuple(cell)].item()
    return out
