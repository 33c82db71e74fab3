"""A probe at every site, with the controls that make its accuracy mean something.

1. Collect the labelled positions (labels >= 0) at every site (default: the embeddings, then each
   layer's `hook_resid_post`).
2. At each site, fit the probe (`fit_probe`, split by prompt) and keep its held-out accuracy.
3. Controls, each trained the same way, on the same split:
   - shuffled labels (the labels permuted over rows): what the probe learns from nothing;
   - a randomly re-initialised copy of the model (`model.reinitialized(seed)`): what an untrained
     network's activations already give (token identity mixed by random attention);
   - baselines that see one feature only, by default the absolute position (one-hot): what the
     label owes to where the token stands.
4. At the best site: per-class F1, the confusion matrix, and the cosine similarities between the
   classes' directions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.models.hooked import technique
from mechscope.probes.collect import collect
from mechscope.probes.fit import cosine_similarities, fit_probe
from mechscope.result import Result

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel


@dataclass(frozen=True)
class ProbeDataset:
    """Token ids [prompt, pos] and a label per position (-1: no label, not a row)."""

    tokens: Int[Tensor, "prompt pos"]
    labels: Int[Tensor, "prompt pos"]

    def __post_init__(self):
        if self.tokens.shape != self.labels.shape:
            raise InputError(f"tokens {tuple(self.tokens.shape)} and labels {tuple(self.labels.shape)} must have "
                             "one shape")
        if not (self.labels >= 0).any():
            raise InputError("no position has a label (labels are -1 everywhere)")

    @property
    def mask(self) -> Tensor:
        return self.labels >= 0


def residual_sites(model: "HookedModel") -> list[str]:
    """The residual stream before layer 0 (the embeddings), then after every layer."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]


@technique
def probe_sweep(
    model: "HookedModel",
    dataset: ProbeDataset,
    *,
    sites: Sequence[str] | None = None,
    controls: bool = True,
    baselines: dict[str, Float[Tensor, "prompt pos feature"]] | None = None,
    kind: str = "logistic",
    test_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 32,
    log: Callable[[str], None] = lambda text: None,
) -> Result:
    """Probe accuracy per site, beside its controls (module docstring). Returns a Result (site x
    metric); `extra` holds the best site's per-class F1, confusion and direction cosines, and every
    site's per-class F1."""
    start = time.perf_counter()
    sites = list(sites) if sites is not None else residual_sites(model)
    mask = dataset.mask.cpu()
    acts = collect(model, dataset.tokens, sites, positions=mask, batch_size=batch_size)
    labels = dataset.labels.cpu()[mask]  # [row], in collect's row order (prompt, then position)
    groups = acts.prompt
    fit = dict(groups=groups, kind=kind, test_fraction=test_fraction, seed=seed)

    if baselines is None:
        position = torch.arange(dataset.tokens.shape[1]).expand(dataset.tokens.shape)  # [prompt, pos]
        baselines = {"position": torch.nn.functional.one_hot(position).double()}  # [prompt, pos, pos]
    base = {}
    for name, features in baselines.items():
        if features.shape[:2] != dataset.tokens.shape:
            raise InputError(f"baseline {name!r} has shape {tuple(features.shape)}; it needs [prompt, pos, feature] "
                             f"with [prompt, pos] = {tuple(dataset.tokens.shape)}")
        base[f"{name}_baseline"] = fit_probe(features.cpu()[mask], labels, **fit).test_accuracy
        log(f"{name} baseline: {base[f'{name}_baseline']:.3f}")

    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 1))]
    reinit = None
    if controls:
        control_model = model.reinitialized(seed)
        reinit = collect(control_model, dataset.tokens, sites, positions=mask, batch_size=batch_size)
        del control_model

    metrics = ["accuracy", "train_accuracy", "chance", *base] + (["shuffled_labels", "random_init_control"]
                                                                if controls else [])
    values = torch.full((len(sites), len(metrics)), float("nan"), dtype=torch.float64)
    probes, f1 = {}, {}
    for i, site in enumerate(sites):
        x = acts[site]
        probe = fit_probe(x, labels, site=site, **fit)
        probes[site], f1[site] = probe, probe.f1
        row = {"accuracy": probe.test_accuracy, "train_accuracy": probe.train_accuracy, "chance": probe.chance, **base}
        if controls:
            row["shuffled_labels"] = fit_probe(x, shuffled, **fit).test_accuracy
            row["random_init_control"] = fit_probe(reinit[site], labels, **fit).test_accuracy
        values[i] = torch.tensor([row[m] for m in metrics], dtype=torch.float64)
        log(f"{site}: accuracy {probe.test_accuracy:.3f}" + (f", shuffled {row['shuffled_labels']:.3f}, "
                                                             f"random init {row['random_init_control']:.3f}"
                                                             if controls else ""))
    best = max(sites, key=lambda s: probes[s].test_accuracy)
    top = probes[best]
    extra = {"best_site": best, "classes": top.classes, "best": top.summary(), "per_class_f1": f1,
             "n_rows": len(labels), "n_train": top.n_train, "n_test": top.n_test, "kind": kind}
    if kind != "mlp":
        extra["direction_cosines"] = cosine_similarities(top.directions).tolist()
    acts.close()
    if reinit is not None:
        reinit.close()
    return Result(values=values, axes=("site", "metric"), labels={"site": sites, "metric": metrics},
                  technique="probe_sweep", model=model.cfg.model_name, n_prompts=int(mask.any(1).sum()),
                  seconds=round(time.perf_counter() - start, 2), extra=extra)
