"""PatchResult: what a patching technique found, with labelled axes; serializable and plottable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class PatchResult:
    """`values[...]` along `axes` (e.g. ("layer", "head")), labelled by `labels[axis]`: the change
    in the metric when that component is patched, averaged over prompts."""

    values: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    site: str
    technique: str  # "exact", "atp", "atp*"
    metric: str
    direction: str  # "denoise" (clean into corrupt) or "noise" (corrupt into clean)
    clean_metric: float
    corrupt_metric: float
    model: str
    n_prompts: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        expected = tuple(len(self.labels[a]) for a in self.axes)
        if tuple(self.values.shape) != expected:
            raise ValueError(f"values have shape {tuple(self.values.shape)} but the labels say {expected}")

    def normalized(self) -> Tensor:
        """values / (clean - corrupt): denoising gives 1 where a component restores the clean
        metric fully, noising gives -1 where it destroys it."""
        return self.values / (self.clean_metric - self.corrupt_metric)

    def top(self, k: int = 10) -> list[tuple[dict[str, str], float]]:
        """The k components of largest |effect|: ({axis: label}, value)."""
        flat = self.values.flatten()
        order = flat.abs().argsort(descending=True)[:k]
        out = []
        for i in order.tolist():
            index = torch.unravel_index(torch.tensor(i), self.values.shape)
            out.append(({a: self.labels[a][int(j)] for a, j in zip(self.axes, index)}, flat[i].item()))
        return out

    def to_frame(self):
        """A long pandas DataFrame: one row per component, a column per axis, then value and normalized."""
        import pandas as pd

        grids = torch.meshgrid(*[torch.arange(len(self.labels[a])) for a in self.axes], indexing="ij")
        data = {a: [self.labels[a][i] for i in g.flatten().tolist()] for a, g in zip(self.axes, grids)}
        data["value"] = self.values.flatten().tolist()
        data["normalized"] = self.normalized().flatten().tolist()
        return pd.DataFrame(data)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["values"] = self.values.tolist()
        d["axes"] = list(self.axes)
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict())
        if path is not None:
            tmp = Path(str(path) + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)  # no half-written result file
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "PatchResult":
        d = dict(d)
        d["values"] = torch.tensor(d["values"], dtype=torch.float32)
        d["axes"] = tuple(d["axes"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "PatchResult":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        return cls.from_dict(json.loads(text))

    def plot(self, *, normalized: bool = False):
        """A plotly heatmap (layer down, head or position across; a 3-axis result sums over heads)."""
        import plotly.graph_objects as go

        values = self.normalized() if normalized else self.values
        axes = list(self.axes)
        if values.ndim == 3:  # layer x head x pos: show layer x pos summed over heads
            values, axes = values.sum(1), ["layer", "pos"]
        if values.ndim == 1:
            values, axes = values[:, None], ["layer", "all"]
        x = self.labels.get(axes[1], ["all"])
        limit = float(values.abs().max()) or 1.0
        fig = go.Figure(go.Heatmap(z=values.tolist(), x=x, y=self.labels["layer"], colorscale="RdBu",
                                   zmin=-limit, zmax=limit, hovertemplate="layer %{y}, %{x}: %{z:.4f}<extra></extra>"))
        fig.update_layout(title=f"{self.technique} patching of {self.site} ({self.direction}, {self.metric})",
                          xaxis_title=axes[1], yaxis_title="layer", yaxis_autorange="reversed")
        return fig

    def __repr__(self) -> str:
        shape = " x ".join(f"{a} {len(self.labels[a])}" for a in self.axes)
        return (f"PatchResult({self.technique} {self.site}, {self.direction}, {shape}; "
                f"{self.metric}: clean {self.clean_metric:.3f}, corrupt {self.corrupt_metric:.3f}; {self.seconds:.1f} s)")
