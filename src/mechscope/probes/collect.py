"""Activations at chosen sites and positions over a dataset, for probes.

1. Choose the rows: every real position of every prompt (text), every position (token ids), or the
   positions given (a boolean mask [prompt, pos], or one list of positions per prompt).
2. Run the prompts in batches under no_grad; a hook at each site keeps only the chosen rows, cast
   to `dtype` and moved to the CPU, so memory grows with the rows kept, never with [batch, pos].
   The forward stops once the last site has been read (no later layer, no unembedding).
3. Past `memory_mb`, each batch's rows go to disk as one safetensors shard in a private temporary
   folder (removed when the `Activations` is closed or collected) and stream back one shard at a
   time (`batches(site)`), or all at once (`acts[site]`) when they fit.
Each row remembers its prompt and position, so a split by prompt never leaks a prompt into both
sides (`fit_probe(..., groups=acts.prompt)`).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.models.hooked import technique

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Collected(Exception):
    """Raised by the last site's hook: the forward has given everything asked of it."""


class Activations:
    """Rows of activations: `acts[site]` is [row, ...] (the site's trailing shape), `acts.prompt`
    and `acts.position` are [row]: where each row came from."""

    def __init__(self, sites: Sequence[str], prompt: Tensor, position: Tensor, shapes: dict[str, tuple],
                 memory: dict[str, list[Tensor]] | None, folder: Path | None, shards: int = 0):
        self.sites = tuple(sites)
        self.prompt: Int[Tensor, " row"] = prompt
        self.position: Int[Tensor, " row"] = position
        self.shapes = shapes
        self._memory = memory
        self.folder = folder
        self._shards = shards
        if folder is not None:
            self._cleanup = weakref.finalize(self, shutil.rmtree, folder, True)

    @property
    def spilled(self) -> bool:
        """True when the rows live on disk (shards), not in memory."""
        return self.folder is not None

    def __len__(self) -> int:
        return self.prompt.shape[0]

    def __repr__(self) -> str:
        where = f"spilled to {self.folder}" if self.spilled else "in memory"
        return f"Activations({len(self)} rows from {int(self.prompt.max()) + 1 if len(self) else 0} prompts, sites {list(self.sites)}, {where})"

    def batches(self, site: str) -> Iterator[Tensor]:
        """The rows of `site` one batch (shard) at a time, in row order."""
        self._check(site)
        if self._memory is not None:
            yield from self._memory[site]
            return
        from safetensors.torch import load_file

        for i in range(self._shards):
            yield load_file(self.folder / f"shard-{i:05d}.safetensors")[site]

    def __getitem__(self, site: str) -> Tensor:
        parts = list(self.batches(site))
        return torch.cat(parts) if parts else torch.empty(0, *self.shapes.get(site, ()))

    def _check(self, site: str) -> None:
        if site not in self.sites:
            raise InputError(f"{site!r} was not collected; these were: {', '.join(self.sites)}")
        if self.spilled and not self.folder.exists():
            raise InputError("these activations were closed (their shards are deleted)")

    def close(self) -> None:
        """Delete the shards on disk now (a no-op for activations in memory)."""
        if self.folder is not None:
            self._cleanup()


@technique
def collect(
    model: "HookedModel",
    tokens: Int[Tensor, "prompt pos"] | Sequence[str],
    sites: str | Sequence[str],
    *,
    positions: Bool[Tensor, "prompt pos"] | Sequence[Sequence[int]] | None = None,
    batch_size: int = 32,
    dtype: str = "float32",
    memory_mb: float = 2048,
    folder: str | Path | None = None,
) -> Activations:
    """Activations at `sites` (hook names) for the chosen positions of every prompt (see the module
    docstring). `folder`: where a spilled collection puts its temporary shards (default: the
    system's temporary folder)."""
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise InputError("no sites to collect: name at least one hook, e.g. 'blocks.3.hook_resid_post'")
    names = [n for name in names for n in model._resolve(name)]
    for name in names:
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            raise InputError(f"{name} is [batch, head, q_pos, k_pos], not one vector per position; collect "
                             "hook_z or the residual stream instead")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise InputError(f"batch_size must be a whole number of at least 1, not {batch_size!r}")
    if not memory_mb > 0:
        raise InputError(f"memory_mb must be positive, not {memory_mb!r}")
    ids, mask = _rows(model, tokens, positions)  # [prompt, pos], [prompt, pos]
    out_dtype = DTYPES[dtype]

    memory: dict[str, list[Tensor]] = {n: [] for n in names}
    shapes: dict[str, tuple] = {}
    spill: Path | None = None
    shards = 0
    try:
        for start in range(0, ids.shape[0], batch_size):
            chunk, keep = ids[start: start + batch_size], mask[start: start + batch_size]
            width = int(keep.nonzero()[:, 1].max()) + 1 if keep.any() else 1  # no need to run past the last row
            chunk, keep = chunk[:, :width], keep[:, :width].to(model.device)
            got: dict[str, Tensor] = {}

            def grab(act: Tensor, hook) -> None:
                got[hook.name] = act[keep].to("cpu", out_dtype)  # [rows, ...]
                if len(got) == len(names):
                    raise _Collected  # the layers after the last site, and the unembedding, are not needed

            try:
                with torch.no_grad():
                    model.run_with_hooks(chunk, fwd_hooks=[(n, grab) for n in names])
            except _Collected:
                pass
            if start == 0:
                shapes = {n: tuple(got[n].shape[1:]) for n in names}
                row_bytes = sum(got[n][0].numel() if len(got[n]) else 0 for n in names) * out_dtype.itemsize
                if row_bytes * int(mask.sum()) > memory_mb * 2**20:
                    spill = Path(tempfile.mkdtemp(prefix="mechscope-activations-", dir=folder))
            if spill is not None:
                from safetensors.torch import save_file

                save_file({n: got[n].contiguous() for n in names}, spill / f"shard-{shards:05d}.safetensors")
                shards += 1
            else:
                for n in names:
                    memory[n].append(got[n])
    except BaseException:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
        raise
    prompt, position = mask.nonzero(as_tuple=True)  # row order: prompt, then position
    return Activations(names, prompt.cpu(), position.cpu(), shapes, None if spill else memory, spill, shards)


def _rows(model: "HookedModel", tokens, positions) -> tuple[Tensor, Tensor]:
    """(token ids [prompt, pos] on the model's device, the chosen rows as a mask [prompt, pos])."""
    if isinstance(tokens, str):
        tokens = [tokens]
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str):
        ids = model.to_tokens(list(tokens))
        real = torch.arange(ids.shape[1], device=ids.device) <= model.last_positions(list(tokens))[:, None]
        ids = model._as_tokens(ids, whole_batch=False)
    else:
        ids = model._as_tokens(tokens, whole_batch=False)  # run in batches: each batch is checked
        real = torch.ones_like(ids, dtype=torch.bool)
    if positions is None:
        return ids, real.cpu()
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape != ids.shape:
            raise InputError(f"a positions mask must have the tokens' shape {tuple(ids.shape)}, not "
                             f"{tuple(positions.shape)}")
        mask = positions.cpu()
    else:
        if len(positions) != ids.shape[0]:
            raise InputError(f"give one list of positions per prompt: {ids.shape[0]} prompts, {len(positions)} lists")
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, chosen in enumerate(positions):
            chosen = torch.as_tensor(chosen, dtype=torch.long).flatten()
            if chosen.numel() and (chosen.min() < 0 or chosen.max() >= ids.shape[1]):
                raise InputError(f"prompt {i}: positions {chosen.tolist()} are outside 0 .. {ids.shape[1] - 1}")
            mask[i, chosen] = True
    if not mask.any():
        raise InputError("no positions chosen: every prompt's list (or the mask) is empty")
    if (mask & ~real.cpu()).any():
        raise InputError("some chosen positions are padding (past a prompt's last token)")
    return ids, mask
