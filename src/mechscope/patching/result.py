"""PatchResult: what a patching technique found, per component, as a labelled Result."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mechscope.result import Result


@dataclass(frozen=True, kw_only=True)
class PatchResult(Result):
    """The change in the metric when each component is patched, averaged over prompts."""

    site: str
    metric: str
    direction: str  # "denoise" (clean into corrupt) or "noise" (corrupt into clean)
    clean_metric: float
    corrupt_metric: float

    def normalized(self) -> Tensor:
        """values / (clean - corrupt): denoising gives 1 where a component restores the clean
        metric fully, noising gives -1 where it destroys it."""
        return self.values / (self.clean_metric - self.corrupt_metric)

    def _columns(self) -> dict[str, Tensor]:
        return {"value": self.values, "normalized": self.normalized()}

    def _title(self) -> str:
        return f"{self.technique} patching of {self.site} ({self.direction}, {self.metric})"

    def plot(self, *, normalized: bool = False):
        """A plotly heatmap (layer down, head or position across; a 3-axis result sums over heads)."""
        return super().plot(self.normalized() if normalized else None)

    def __repr__(self) -> str:
        shape = " x ".join(f"{a} {len(self.labels[a])}" for a in self.axes)
        return (f"PatchResult({self.technique} {self.site}, {self.direction}, {shape}; "
                f"{self.metric}: clean {self.clean_metric:.3f}, corrupt {self.corrupt_metric:.3f}; {self.seconds:.1f} s)")
