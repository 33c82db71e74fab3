"""Cluster: Ray workers that each hold their own copy of a model, and the loop that spreads a
technique's prompts over them.

1. Start Ray (`workers=N`: a local instance with N workers' CPUs) or join a running cluster
   (`address="auto" | "host:port" | "ray://host:port"`, checked to answer before Ray is asked).
2. Start N actors; each loads the model itself (a `load_model` spec, or a function returning a
   HookedModel), with `cpus_per_worker` threads and, when asked, a GPU of its own.
3. Split the batch into shards (default: two per worker, so a fast worker takes more) and hand
   each idle worker the next one; progress counts prompts done over all workers.
4. A worker that dies (killed, out of memory) loses nothing: a fresh one takes its place and its
   shard runs again, up to `retries` times per shard. A technique's own error (bad input) stops
   the run at once with that error.
5. Combine the shards' results exactly (shards.py): the same numbers as one process.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections import deque
from typing import Callable

import torch

from mechscope.errors import DistributedError, InputError, MechscopeError
from mechscope.progress import progress_bar
from mechscope.distributed.shards import check_shardable, collect_part, combine, combine_rows, shard_kwargs, split


def _ray():
    try:
        import ray
    except ImportError:
        raise DistributedError("Ray is not installed; install it with pip install 'mechscope[distributed]' "
                               "(or run without workers)") from None
    return ray


class _Worker:
    """One Ray actor: a model of its own, and techniques run on the shards it is handed."""

    def load(self, load: Callable, threads: int) -> int:
        torch.set_num_threads(threads)
        self.model = load()
        self.objects: dict = {}  # what a worker keeps between calls (a shard's Knockouts), by key
        return os.getpid()

    def run(self, technique: Callable, batch, kwargs: dict):
        return technique(self.model, batch, **kwargs)

    def keep(self, key: str, factory: Callable, args: tuple, kwargs: dict) -> None:
        self.objects[key] = factory(self.model, *args, **kwargs)

    def attribute(self, key: str, name: str):
        return getattr(self.objects[key], name)

    def call(self, key: str, method: str, *args):
        return getattr(self.objects[key], method)(*args)


class Cluster:
    """N workers, each holding `model` (a spec for `load_model`, e.g. "smollm2-135m" or a directory,
    loaded with `dtype` and `device`; or a function that returns a HookedModel).

        with Cluster("smollm2-135m", workers=2) as cluster:
            result = cluster.run(activation_patch, batch, site="head_z")

    `address` joins a running Ray cluster instead of starting one (its nodes need mechscope
    installed); `gpus_per_worker=1` gives each worker a GPU (load with device="cuda")."""

    def __init__(self, model, *, workers: int = 2, address: str | None = None, dtype: str = "float32",
                 device: str = "cpu", cpus_per_worker: int = 1, gpus_per_worker: float = 0, retries: int = 2):
        if not isinstance(workers, int) or workers < 1:
            raise InputError(f"workers must be a positive integer, not {workers!r}")
        if not isinstance(retries, int) or retries < 0:
            raise InputError(f"retries must be 0 or more, not {retries!r}")
        if not (callable(model) or isinstance(model, (str, os.PathLike))):
            raise InputError(f"model must be a spec for load_model (alias, directory, .gguf, hub id) or a function "
                             f"returning a HookedModel, not {type(model).__name__}")
        self.ray = ray = _ray()
        self._owns_ray = not ray.is_initialized()
        if address is not None:
            _check_address(address, connected=None if self._owns_ray else ray.get_runtime_context().gcs_address)
        from mechscope.models.load import load_model

        self._load = model if callable(model) else functools.partial(load_model, str(model), dtype=dtype, device=device)
        self.workers, self.retries, self._threads = workers, retries, cpus_per_worker
        if self._owns_ray:
            try:
                ray.init(address=address, num_cpus=None if address else workers * cpus_per_worker,
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, ValueError) as err:
                raise DistributedError(f"cannot join the Ray cluster at {address}: {err}") from None
        _check_resources(ray, workers, cpus_per_worker, gpus_per_worker, self._owns_ray)
        self._actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_Worker)
        self._actors: list = []
        self.pids: list[int] = []  # each worker's process id, in order (a replaced worker's is replaced)
        try:
            for _ in range(workers):
                self._actors.append(self._actor.remote())
            self.pids = self._get([a.load.remote(self._load, self._threads) for a in self._actors])
        except BaseException:
            self.close()
            raise

    def run(self, technique: Callable, batch, *, shards: int | None = None, progress: bool = False, **kwargs):
        """`technique(model, batch_shard, **kwargs)` on every shard, combined: equal to
        `technique(model, batch, **kwargs)` in one process (a mean over prompts). Returns the
        combined result with `extra["workers"]`, `extra["shards"]` and `extra["retried"]`."""
        start = time.perf_counter()
        check_shardable(kwargs)
        keep_layers = kwargs.get("graddrop_layers", False)
        if kwargs.get("method") == "atp*":  # GradDrop combines from its per-layer estimates
            kwargs = {**kwargs, "graddrop_layers": True}
        bounds = split(batch, self.workers * 2 if shards is None else shards)
        parts = [(batch.rows(a, b), shard_kwargs(kwargs, a, b, len(batch))) for a, b in bounds]
        results = self._spread(technique, parts, progress, getattr(technique, "__name__", "technique"))
        extra = {"workers": self.workers, "shards": len(bounds), "retried": self._retried}
        out = combine(results, [b - a for a, b in bounds], batch, time.perf_counter() - start, extra)
        if not keep_layers:
            for r in (out.values() if isinstance(out, dict) else [out]):
                r.extra.pop("graddrop_layers", None)
        return out

    def collect(self, tokens, sites, *, positions=None, shards: int | None = None, progress: bool = False, **kwargs):
        """`probes.collect(model, tokens, sites, positions=..., **kwargs)` over the workers: the same
        rows in the same order, with the whole set's prompt numbers, held in this process's memory
        (one batch per shard). A positions mask becomes lists per prompt, so that each shard's
        prompts may pad to their own width."""
        if isinstance(tokens, str):
            tokens = [tokens]
        if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
            if positions.ndim != 2 or positions.shape[0] != len(tokens):
                raise InputError(f"a positions mask must be [prompt, pos] with {len(tokens)} prompts, not "
                                 f"{tuple(positions.shape)}")
            positions = [row.nonzero().flatten().tolist() for row in positions]
        if positions is not None and len(positions) != len(tokens):
            raise InputError(f"give one list of positions per prompt: {len(tokens)} prompts, {len(positions)} lists")
        bounds = split(tokens, self.workers * 2 if shards is None else shards)
        parts = [(tokens[a:b], {"sites": sites, "positions": None if positions is None else positions[a:b], **kwargs})
                 for a, b in bounds]
        return combine_rows(self._spread(collect_part, parts, progress, "collect"), bounds)

    def knockouts(self, batch, *, reference=None):
        """`analysis.circuit.Knockouts(model, batch, reference=...)` over the workers, each keeping its
        shard's (see distributed/knockouts.py): pass it as `knockouts=` to faithfulness, completeness
        and minimality. The same logit differences as one process."""
        from mechscope.distributed.knockouts import ShardedKnockouts

        return ShardedKnockouts(self, batch, reference=reference)

    def _spread(self, technique, parts: list, progress: bool, name: str) -> list:
        """Each part to the next idle worker; a dead worker replaced and its part run again."""
        ray = self.ray
        results: list = [None] * len(parts)
        pending, running, idle = deque(range(len(parts))), {}, deque(range(len(self._actors)))
        tries = [0] * len(parts)
        self._retried = 0
        total = sum(len(b) for b, _ in parts)
        with progress_bar(progress, total, f"{name} on {self.workers} workers") as bar:
            while pending or running:
                while pending and idle:
                    i, slot = pending.popleft(), idle.popleft()
                    running[self._actors[slot].run.remote(technique, *parts[i])] = (i, slot)
                (ref,), _ = ray.wait(list(running), num_returns=1)
                i, slot = running.pop(ref)
                try:
                    results[i] = self._get(ref)
                except ray.exceptions.RayActorError:  # the worker died: replace it, run its part again
                    tries[i] += 1
                    if tries[i] > self.retries:
                        raise DistributedError(f"shard {i} ({len(parts[i][0])} prompts) lost its worker "
                                               f"{tries[i]} times; giving up (is a worker running out of memory?)") from None
                    self._retried += 1
                    self._replace(slot)
                    pending.appendleft(i)
                else:
                    bar.advance(len(parts[i][0]))
                idle.append(slot)
        return results

    def _replace(self, slot: int) -> None:
        self.ray.kill(self._actors[slot], no_restart=True)
        self._actors[slot] = self._actor.remote()
        self.pids[slot] = self._get(self._actors[slot].load.remote(self._load, self._threads))

    def _get(self, refs):
        """ray.get, with a technique's own error raised as itself (not wrapped in Ray's)."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, MechscopeError):
                raise cause from None
            raise

    def close(self) -> None:
        """Stop the workers (and Ray, if this cluster started it)."""
        ray = self.ray
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self._actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_resources(ray, workers: int, cpus: int, gpus: float, owned: bool) -> None:
    """Workers that Ray cannot place would wait for ever: say so instead (e.g. a second Cluster in a
    process whose Ray instance the first one fills)."""
    free = ray.available_resources()
    for what, each in (("CPU", cpus), ("GPU", gpus)):
        if each and free.get(what, 0) < workers * each:
            if owned:
                ray.shutdown()
            raise DistributedError(f"{workers} workers need {workers * each:g} {what}s and Ray has {free.get(what, 0):g} "
                                   f"free; use fewer workers, or close the other Cluster of this process first")


def _check_address(address: str, connected: str | None = None) -> None:
    """"auto", or a host:port (optionally ray://) that accepts a connection, checked in seconds:
    Ray itself waits minutes on an address where nothing answers. A process already `connected` to
    a Ray instance can only use that one."""
    if address in ("auto", connected):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        raise DistributedError(f"Ray address {address!r} is not host:port, ray://host:port or auto")
    if connected is not None:
        raise DistributedError(f"this process is already connected to the Ray instance at {connected}, not "
                               f"{address}; close the other Cluster (or ray.shutdown()) first, or leave address out")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise DistributedError(f"no Ray cluster answers at {address} ({err.strerror or err}); start one with "
                               "`ray start --head`, or give workers=N without an address for a local one") from None


def run(technique: Callable, batch, *, model, workers: int = 2, address: str | None = None, dtype: str = "float32",
        device: str = "cpu", shards: int | None = None, progress: bool = False, **kwargs):
    """`technique` over `batch` on `workers` Ray workers that each load `model`, combined exactly:
    one call for one run (a `Cluster` keeps the workers, and their models, for several)."""
    check_shardable(kwargs)  # before any worker starts
    with Cluster(model, workers=workers, address=address, dtype=dtype, device=device) as cluster:
        return cluster.run(technique, batch, shards=shards, progress=progress, **kwargs)
