"""Result: a labelled tensor that a technique returns; serializable, tabular and plottable.

Techniques subclass it with their own fields (patching: `PatchResult`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor


def json_safe(value):
    """`value` with NaN and infinities as None: strict JSON (a browser's JSON.parse rejects NaN).
    NaN marks a cell that was not measured."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _nan_for_none(values):
    if isinstance(values, list):
        return [_nan_for_none(v) for v in values]
    return float("nan") if values is None else values


def write_json(data: dict, path: str | Path | None = None, *, indent: int | None = None) -> str:
    """Strict JSON text of `data`; written atomically to `path` when given (no half-written file)."""
    text = json.dumps(json_safe(data), allow_nan=False, indent=indent)
    if path is not None:
        from mechscope.outputs import write_file

        write_file(path, text)
    return text


@dataclass(frozen=True, kw_only=True)
class Result:
    """`values[...]` along `axes` (e.g. ("layer", "head")), labelled by `labels[axis]`."""

    values: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    technique: str
    model: str
    n_prompts: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        expected = tuple(len(self.labels[a]) for a in self.axes)
        if tuple(self.values.shape) != expected:
            raise ValueError(f"values have shape {tuple(self.values.shape)} but the labels say {expected}")

    def top(self, k: int = 10) -> list[tuple[dict[str, str], float]]:
        """The k cells of largest |value|: ({axis: label}, value)."""
        flat = self.values.flatten()
        out = []
        for i in flat.abs().nan_to_num(-1.0).argsort(descending=True)[:k].tolist():  # NaN: not measured
            index = torch.unravel_index(torch.tensor(i), self.values.shape)
            out.append(({a: self.labels[a][int(j)] for a, j in zip(self.axes, index)}, flat[i].item()))
        return out

    def _columns(self) -> dict[str, Tensor]:
        return {"value": self.values}

    def to_frame(self):
        """A long pandas DataFrame: one row per cell, a column per axis, then the values."""
        import pandas as pd

        grids = torch.meshgrid(*[torch.arange(len(self.labels[a])) for a in self.axes], indexing="ij")
        data = {a: [self.labels[a][i] for i in g.flatten().tolist()] for a, g in zip(self.axes, grids)}
        data.update({name: column.flatten().tolist() for name, column in self._columns().items()})
        return pd.DataFrame(data)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["values"] = self.values.tolist()
        d["axes"] = list(self.axes)
        d["dtype"] = str(self.values.dtype).removeprefix("torch.")  # JSON numbers hold float64 exactly
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        return write_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        dtype = getattr(torch, d.get("dtype", "float32"), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype {d['dtype']!r} is not a floating-point dtype")
        d["values"] = torch.tensor(_nan_for_none(d["values"]), dtype=dtype)
        d["axes"] = tuple(d["axes"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text(encoding="utf-8-sig")
        return cls.from_dict(json.loads(text))

    def _title(self) -> str:
        return self.technique

    def plot(self, values: Tensor | None = None):
        """A plotly heatmap: the first axis down, the second across (a third is summed over the
        middle one: layer x head x pos shows layer x pos)."""
        import plotly.graph_objects as go

        values = self.values if values is None else values
        axes = list(self.axes)
        if values.ndim == 3:
            values, axes = values.sum(1), [axes[0], axes[2]]
        if values.ndim == 1:
            values, axes = values[:, None], [axes[0], "all"]
        x = self.labels.get(axes[1], ["all"])
        limit = float(values.abs().max()) or 1.0
        fig = go.Figure(go.Heatmap(z=values.tolist(), x=x, y=self.labels[axes[0]], colorscale="RdBu",
                                   zmin=-limit, zmax=limit,
                                   hovertemplate=f"{axes[0]} %{{y}}, {axes[1]} %{{x}}: %{{z:.4f}}<extra></extra>"))
        fig.update_layout(title=self._title(), xaxis_title=axes[1], yaxis_title=axes[0], yaxis_autorange="reversed")
        return fig

    def _repr_html_(self) -> str:
        """In a notebook, the result shows itself as its report (heatmap, top components)."""
        from mechscope.report import html, render

        return html.iframe(render(self))

    def __repr__(self) -> str:
        shape = " x ".join(f"{a} {len(self.labels[a])}" for a in self.axes)
        return f"{type(self).__name__}({self.technique}, {shape}; {self.model}, {self.n_prompts} prompts; {self.seconds:.1f} s)"
