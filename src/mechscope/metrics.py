"""Metrics: plain functions of the logits at each prompt's read position and the batch.

A metric takes `logits` [..., batch, d_vocab] (the read position of each prompt; leading dimensions,
such as patched variants, are allowed) and a ContrastiveBatch, and returns one value per prompt,
[..., batch]. Patching averages over prompts. Any function of that signature is a custom metric.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.tasks.batch import ContrastiveBatch

Metric = Callable[[Float[Tensor, "... batch d_vocab"], "ContrastiveBatch"], Float[Tensor, "... batch"]]


def widen(x: Tensor) -> Tensor:
    """`x` in at least float32 (half precision is widened; float64 stays float64), for averages."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _pick(logits: Tensor, ids: Tensor) -> Tensor:
    """logits[..., b, ids[b]] -> [..., batch]."""
    index = ids.to(logits.device).expand(logits.shape[:-1])[..., None]  # [..., batch, 1]
    return logits.gather(-1, index)[..., 0]


def at_positions(x: Float[Tensor, "... batch pos d"], positions: Tensor) -> Float[Tensor, "... batch d"]:
    """x[..., b, positions[b], :]: one position per prompt (e.g. its read position)."""
    rows = torch.arange(x.shape[-3], device=x.device)
    return x[..., rows, positions.to(x.device), :]


def read_logits(logits: Float[Tensor, "... batch pos d_vocab"], batch: "ContrastiveBatch") -> Float[Tensor, "... batch d_vocab"]:
    """The logits at each prompt's read position."""
    return at_positions(logits, batch.read_pos)


def logit_diff(logits: Tensor, batch: "ContrastiveBatch") -> Tensor:
    """Logit of the answer minus logit of the wrong answer."""
    return _pick(logits, batch.answer) - _pick(logits, batch.wrong)


def answer_prob(logits: Tensor, batch: "ContrastiveBatch") -> Tensor:
    """Probability of the answer."""
    return _pick(widen(logits).softmax(-1), batch.answer)


def kl_div(logits: Tensor, batch: "ContrastiveBatch", *, reference: Tensor) -> Tensor:
    """KL(reference || logits) of the next-token distributions; the reference is the clean run's."""
    log_p = widen(reference).log_softmax(-1)  # [batch, d_vocab]
    log_q = widen(logits).log_softmax(-1)  # [..., batch, d_vocab]
    return (log_p.exp() * (log_p - log_q)).sum(-1)


METRICS = {"logit_diff": logit_diff, "answer_prob": answer_prob, "kl_div": kl_div}


def narrow(fn: Metric, batch: "ContrastiveBatch") -> tuple[Tensor | None, Metric]:
    """(tokens [batch, t], the metric of the logits [..., batch, t] of those tokens only) for a metric
    that reads a few logits (logit_diff: the answer's and the wrong answer's), so that patched runs
    unembed only those (`HookedModel.logits_from_resid(tokens=)`; smollm2: 2 of 49,152 columns);
    (None, fn) for any other metric, which gets every logit."""
    if fn is logit_diff:
        return torch.stack([batch.answer, batch.wrong], -1), _narrow_logit_diff
    return None, fn


def _narrow_logit_diff(logits: Tensor, batch: "ContrastiveBatch") -> Tensor:
    return logits[..., 0] - logits[..., 1]  # [..., batch]: the answer's column minus the wrong answer's


def check_metric_name(metric: str | Metric) -> None:
    """An InputError unless `metric` is a built-in metric's name or a function (before any work)."""
    if not callable(metric) and metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)} or a function "
                         "(logits [..., batch, d_vocab], batch) -> [..., batch]")


def check_baselines(name: str, clean: float, corrupt: float) -> None:
    """An InputError when the metric is not a finite number on the clean or the corrupt run: every
    effect, measured against them, would be NaN or infinite."""
    for run, value in (("clean", clean), ("corrupt", corrupt)):
        if not math.isfinite(value):
            raise InputError(f"the metric {name} is {value} on the {run} run, so every effect would be too; "
                             "a custom metric must return finite numbers (check it for 0 / 0 or log(0))")


def resolve_metric(metric: str | Metric, clean_read_logits: Tensor) -> tuple[str, Metric]:
    """(name, function) for a metric name or a custom function; kl_div is bound to the clean run."""
    check_metric_name(metric)
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    if metric == "kl_div":
        return metric, partial(kl_div, reference=clean_read_logits)
    return metric, METRICS[metric]


def from_transformer_lens(fn: Callable[[Tensor], Tensor]) -> Metric:
    """A TransformerLens-style metric, `fn(logits [batch, pos, d_vocab]) -> scalar` (a mean over the
    batch, read at position -1), as a mechscope metric. mechscope's runs unembed only each prompt's
    read position, so `fn` sees logits [batch, 1, d_vocab]: position -1 is the read position, and a
    metric that reads other positions fails with an InputError. Each prompt gets the batch's value
    (their mean is `fn`'s)."""

    def metric(logits: Tensor, batch: "ContrastiveBatch") -> Tensor:
        flat = logits.reshape(-1, *logits.shape[-2:])  # [variants, batch, d_vocab]
        try:
            values = torch.stack([torch.as_tensor(fn(variant[:, None, :])).reshape(()) for variant in flat])
        except (IndexError, RuntimeError) as err:
            raise InputError(f"the TransformerLens-style metric {getattr(fn, '__name__', fn)!r} failed on logits "
                             f"[batch, 1, d_vocab] ({err}); it sees only the read position: index it as "
                             "logits[:, -1]") from err
        return values.reshape(logits.shape[:-2])[..., None].expand(logits.shape[:-1])  # [..., batch]

    metric.__name__ = getattr(fn, "__name__", "transformer_lens_metric")
    return metric
