"""The computational graph of a transformer as plain data: writers, readers, and the edges between.

Writers put something into the residual stream: `input` (the embeddings, i.e. resid_pre of layer 0),
every attention head (`a{l}.h{h}`: its `hook_result`) and every MLP (`m{l}`). Readers take
something out of it: every head's query, key and value input (`a{l}.h{h}<q`; on grouped-query
models keys and values are read per key/value head, `a{l}.kv{g}<k`), every MLP's input (`m{l}`)
and `logits`. An edge `w->r` joins each writer to each reader that comes after it in the forward:
attention of layer l reads what layers < l wrote; the MLP of layer l also reads layer l's heads,
except on parallel-residual models (GPT-NeoX), where attention and MLP of one layer read the same
stream. Biases are constants of the residual stream, the same in every run, so they are no node.

`Graph.from_spec` needs no model: a graph is rebuilt from the few numbers a result stores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Iterable, Sequence

import torch

from mechscope.errors import InputError


@dataclass(frozen=True)
class Writer:
    name: str
    kind: str  # "input" | "head" | "mlp"
    layer: int  # -1 for input
    head: int | None = None

    @property
    def stage(self) -> int:
        """Place in the forward: input 0, attention of layer l 2l+1, MLP of layer l 2l+2."""
        return {"input": 0, "head": 2 * self.layer + 1, "mlp": 2 * self.layer + 2}[self.kind]


@dataclass(frozen=True)
class Reader:
    name: str
    kind: str  # "q" | "k" | "v" | "qkv" (split_qkv=False) | "mlp" | "logits"
    layer: int  # n_layers for logits
    head: int | None  # query head for q and qkv, key/value head for k and v
    stage: int  # reads every writer of a smaller stage
    parts: tuple[tuple[str, int, int | None], ...]  # the inputs it stands for: (kind, layer, head)
    feeds: tuple[str, ...]  # the writers whose computation reads this input (none for logits)


@dataclass(frozen=True)
class GraphSpec:
    """Everything a graph is built from (a result stores it, so a graph needs no model)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel_residual: bool
    split_qkv: bool = True
    layers: tuple[int, ...] | None = None
    nodes: tuple[str, ...] | None = None


class Graph:
    """Writers, readers and edges, in forward order. `edges` is [n_edges, 2] (writer, reader)."""

    def __init__(self, spec: GraphSpec):
        self.spec = spec
        s = spec
        if not s.split_qkv and s.n_kv_heads != s.n_heads:
            raise InputError(f"split_qkv=False merges each head's q, k and v inputs, but this model's "
                             f"{s.n_heads} query heads share {s.n_kv_heads} key/value heads; use split_qkv=True")
        layers = range(s.n_layers) if s.layers is None else sorted(set(s.layers))
        bad = [l for l in layers if not 0 <= l < s.n_layers]
        if bad:
            raise InputError(f"layers {bad} are not layers of this model (0 .. {s.n_layers - 1})")
        group = s.n_heads // s.n_kv_heads
        kv = "h" if group == 1 else "kv"
        writers = [Writer("input", "input", -1)]
        readers: list[Reader] = []
        for l in layers:
            heads = [f"a{l}.h{h}" for h in range(s.n_heads)]
            writers += [Writer(name, "head", l, h) for h, name in enumerate(heads)]
            writers.append(Writer(f"m{l}", "mlp", l))
            if s.split_qkv:
                readers += [Reader(f"a{l}.h{h}<q", "q", l, h, 2 * l + 1, (("q", l, h),), (heads[h],))
                            for h in range(s.n_heads)]
                for t in "kv":
                    readers += [Reader(f"a{l}.{kv}{g}<{t}", t, l, g, 2 * l + 1, ((t, l, g),),
                                       tuple(heads[g * group:(g + 1) * group])) for g in range(s.n_kv_heads)]
            else:
                readers += [Reader(heads[h], "qkv", l, h, 2 * l + 1, tuple((t, l, h) for t in "qkv"), (heads[h],))
                            for h in range(s.n_heads)]
            readers.append(Reader(f"m{l}", "mlp", l, None, 2 * l + 1 if s.parallel_residual else 2 * l + 2,
                                  (("mlp", l, None),), (f"m{l}",)))
        readers.append(Reader("logits", "logits", s.n_layers, None, 2 * s.n_layers + 1, (("logits", s.n_layers, None),), ()))
        if s.nodes is not None:
            keep = set(s.nodes)
            unknown = keep - {w.name for w in writers} - {"logits"}
            if unknown:
                raise InputError(f"unknown nodes {sorted(unknown)[:5]}; nodes are named input, a{{layer}}.h{{head}}, "
                                 "m{layer} (within the chosen layers)")
            writers = [w for w in writers if w.kind == "input" or w.name in keep]
            readers = [r for r in readers if r.kind == "logits" or any(f in keep for f in r.feeds)]
        self.writers: tuple[Writer, ...] = tuple(writers)
        self.readers: tuple[Reader, ...] = tuple(readers)
        w_stage = torch.tensor([w.stage for w in writers])
        r_stage = torch.tensor([r.stage for r in readers])
        self.edges = (w_stage[:, None] < r_stage[None, :]).nonzero()  # [n_edges, 2], writer-major

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, *, split_qkv: bool = True, layers: Sequence[int] | None = None,
                   nodes: Iterable[str] | None = None) -> "Graph":
        """The graph of a HookedModel; `layers` (negative ones count from the end) and `nodes`
        restrict it (edges outside a restricted graph are never ablated: they keep their clean values)."""
        c = model.cfg
        return cls(GraphSpec(c.n_layers, c.n_heads, c.n_kv_heads, c.parallel_residual, split_qkv,
                             None if layers is None else tuple(int(l) + c.n_layers * (int(l) < 0) for l in layers),
                             None if nodes is None else tuple(nodes)))

    @classmethod
    def from_spec(cls, spec: dict | GraphSpec) -> "Graph":
        if isinstance(spec, dict):
            spec = GraphSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
        return cls(spec)

    def to_spec(self) -> dict:
        return asdict(self.spec)

    # ---- names and counts ---------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return self.edges.shape[0]

    @property
    def n_nodes(self) -> int:
        """Writers plus the logits (a head or MLP is one node, however many inputs it reads)."""
        return len(self.writers) + 1

    @cached_property
    def edge_names(self) -> list[str]:
        return [f"{self.writers[w].name}->{self.readers[r].name}" for w, r in self.edges.tolist()]

    @cached_property
    def edge_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edge_names)}

    @cached_property
    def writer_index(self) -> dict[str, int]:
        return {w.name: i for i, w in enumerate(self.writers)}

    def edges_of(self, names: Iterable[str]) -> torch.Tensor:
        """Edge indices of edge names, with a clear error for a name that is not an edge."""
        out = []
        for name in names:
            if name not in self.edge_index:
                raise InputError(f"{name!r} is not an edge of this graph; edges are named writer->reader, "
                                 f"e.g. {self.edge_names[0]!r} or {self.edge_names[-1]!r}")
            out.append(self.edge_index[name])
        return torch.tensor(out, dtype=torch.long)

    def mask(self, edges: Iterable[str] | torch.Tensor) -> torch.Tensor:
        """A boolean mask [n_edges] of edge names or indices."""
        index = edges if isinstance(edges, torch.Tensor) else self.edges_of(edges)
        m = torch.zeros(self.n_edges, dtype=torch.bool)
        m[index] = True
        return m

    def __repr__(self) -> str:
        return (f"Graph({len(self.writers)} writers, {len(self.readers)} readers, {self.n_edges} edges"
                f"{'' if self.spec.split_qkv else ', q/k/v merged'})")
