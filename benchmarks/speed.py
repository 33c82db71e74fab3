"""Exact patching, fast: one table, in one run, of the naive reference (one full forward per
variant), TransformerLens where it has the operation (its `patching` module on a TransformerBridge
over a copy of the same Hugging Face model: one full forward per variant, as the naive method),
mechscope resuming from the layer only (as before runs resumed at a position), and mechscope, on the
same model and prompts:

- head_z, all positions; head_z per position; resid_pre per position (denoising);
- path patching into the name movers' queries at END (SmolLM2's 23.x), senders in the chosen layers;
- with --ioi, the whole IOI study (both engines; the naive one would take hours), and the study with
  `--screen atp`, with its recall (how many of the exact study's heads it finds).

The naive rows run on `--layers` (default: 3 layers spread over the model), so that they finish.

    .venv/bin/python benchmarks/speed.py [--model smollm2-135m] [--n 8] [--layers 5 15 25] [--ioi]

Each row: seconds, multiple of one plain forward, the naive time over it, the peak resident memory
during the row, and the largest difference from the naive values.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time

import torch

from mechscope import load_model
from mechscope.metrics import logit_diff, read_logits
from mechscope.patching import SITES, activation_patch, path_patch
from mechscope.patching.resume import LayerInputs
from mechscope.tasks import ContrastiveBatch, ioi


@contextlib.contextmanager
def layer_resume_only():
    """mechscope as it was before runs resumed at a position: every run covers every position."""
    saved = LayerInputs.resumable
    LayerInputs.resumable = property(lambda self: False)
    try:
        yield
    finally:
        LayerInputs.resumable = saved


def naive_patch(model, batch, site: str, layers, per_position: bool) -> torch.Tensor:
    """One full forward per (layer, head, position), the clean activation into the corrupt run."""
    spec = SITES[site]
    heads = range(model.cfg.n_heads) if spec.per_head else [None]
    positions = range(batch.clean.shape[1]) if per_position else [None]
    base = logit_diff(read_logits(model(batch.corrupt), batch), batch).mean()
    names = [spec.hook_name(layer) for layer in layers]
    _, cache = model.run_with_cache(batch.clean, names_filter=names)
    out = torch.zeros(len(layers), len(heads), len(positions))
    for li, name in enumerate(names):
        for hi, head in enumerate(heads):
            for pi, pos in enumerate(positions):
                def write(act, hook, head=head, pos=pos):
                    act = act.clone()
                    index = (slice(None), slice(None) if pos is None else pos) + (() if head is None else (head,))
                    act[index] = cache[name][index]
                    return act

                logits = model.run_with_hooks(batch.corrupt, fwd_hooks=[(name, write)])
                out[li, hi, pi] = logit_diff(read_logits(logits, batch), batch).mean() - base
    return out


def tl_patch(bridge, batch, site: str, layers, per_position: bool, n_heads: int) -> torch.Tensor:
    """TransformerLens's exact sweep over the same (layer, head, position) variants as naive_patch,
    denoising (the clean activation into the corrupt run), as [layer, head, position]."""
    import contextlib
    import io
    import itertools

    import pandas as pd
    from transformer_lens import patching

    positions = range(batch.clean.shape[1]) if per_position else [None]
    heads = range(n_heads) if site == "head_z" else [None]
    setter, name, axes = {("head_z", False): (patching.layer_head_vector_patch_setter, "z", ["layer", "head"]),
                          ("head_z", True): (patching.layer_pos_head_vector_patch_setter, "z", ["layer", "pos", "head"]),
                          ("resid_pre", True): (patching.layer_pos_patch_setter, "resid_pre", ["layer", "pos"])}[
        (site, per_position)]
    rows = [{"layer": l, "head": h, "pos": p} for l, h, p in itertools.product(layers, heads, positions)]
    index = pd.DataFrame(rows)[axes]  # in naive_patch's order: layer, then head, then position
    _, clean_cache = bridge.run_with_cache(batch.clean)
    base = logit_diff(read_logits(bridge(batch.corrupt), batch), batch).mean()

    def metric(logits):
        return logit_diff(read_logits(logits, batch), batch).mean() - base

    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        values = patching.generic_activation_patch(bridge, batch.corrupt, clean_cache, metric, setter, name,
                                                   index_df=index)
    return values.reshape(len(layers), len(heads), len(positions))


def naive_path(model, batch, receivers, senders) -> torch.Tensor:
    """Wang et al.'s two forwards per sender (every other head frozen), into the receivers' q at END."""
    n_layers = model.cfg.n_layers
    z = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    q = sorted({f"blocks.{l}.attn.hook_q" for l, _ in receivers})
    _, src = model.run_with_cache(batch.corrupt, names_filter=z)
    _, tgt = model.run_with_cache(batch.clean, names_filter=z + q)
    base = logit_diff(read_logits(model(batch.clean), batch), batch).mean()
    out = []
    rows = torch.arange(len(batch))
    for layer, head in senders:
        def freeze(act, hook):
            frozen = tgt[hook.name].clone()
            if hook.layer == layer:
                frozen[:, :, head] = src[hook.name][:, :, head]
            return frozen

        recorded = {}
        model.run_with_hooks(batch.clean, fwd_hooks=[(n, freeze) for n in z] +
                             [(n, lambda a, h: recorded.__setitem__(h.name, a.clone())) for n in q])

        def write(act, hook):
            act = act.clone()
            for l, h in receivers:
                if l == hook.layer:
                    act[rows, batch.read_pos, h] = recorded[hook.name][rows, batch.read_pos, h]
            return act

        logits = model.run_with_hooks(batch.clean, fwd_hooks=[(n, write) for n in q])
        out.append(logit_diff(read_logits(logits, batch), batch).mean() - base)
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=8, help="IOI prompts (one template: equal lengths)")
    p.add_argument("--layers", type=int, nargs="*", default=None)
    p.add_argument("--receivers", default="23.0,23.1,23.2,23.3,23.5,23.7", help="name movers (SmolLM2's)")
    p.add_argument("--ioi", action="store_true", help="also time the whole IOI study, both engines")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    n_layers = model.cfg.n_layers
    layers = args.layers or [n_layers // 6, n_layers // 2, 5 * n_layers // 6]
    batch = ContrastiveBatch.from_records(model, ioi(args.n, seed=0, model=model, templates=[0]))
    model(batch.corrupt)  # the first forward pays warm-up
    start = time.perf_counter()
    model(batch.corrupt)
    forward = time.perf_counter() - start
    print(f"{model}\n{len(batch)} IOI prompts of {batch.clean.shape[1]} tokens; layers {layers}; "
          f"one plain forward {forward:.2f} s\n")
    print(f"{'operation':38s} {'engine':14s} {'seconds':>8s} {'x forward':>10s} {'naive / it':>10s} "
          f"{'peak GB':>8s} {'max |diff|':>10s}")

    def row(name, engine, fn, naive=None):
        reset_peak()
        start = time.perf_counter()
        values = fn()
        seconds = time.perf_counter() - start
        peak = peak_gb()
        ratio = "" if naive is None else f"{naive[1] / seconds:10.1f}"
        diff = "" if naive is None else f"{(values.reshape(naive[0].shape) - naive[0]).abs().max().item():10.1e}"
        print(f"{name:38s} {engine:14s} {seconds:8.2f} {seconds / forward:10.1f} {ratio:>10s} {peak:8.2f} {diff:>10s}",
              flush=True)
        return values, seconds

    try:
        from common import tl_bridge

        bridge = tl_bridge(model)
    except ImportError as e:  # TransformerLens is a dev dependency
        print(f"(no TransformerLens rows: {e})")
        bridge = None
    for site, per_position in (("head_z", False), ("head_z", True), ("resid_pre", True)):
        name = f"{site} {'per position' if per_position else 'all positions'}"
        naive = row(name, "naive", lambda: naive_patch(model, batch, site, layers, per_position))
        if bridge is not None:
            row(name, "TransformerLens", lambda: tl_patch(bridge, batch, site, layers, per_position,
                                                          model.cfg.n_heads), naive)
        with layer_resume_only():
            row(name, "layers only", lambda: activation_patch(model, batch, site=site, layers=layers,
                                                                per_position=per_position).values, naive)
        row(name, "mechscope", lambda: activation_patch(model, batch, site=site, layers=layers,
                                                         per_position=per_position).values, naive)

    receivers = [tuple(int(x) for x in r.split(".")) for r in args.receivers.split(",")]
    senders = [(l, h) for l in layers if l < min(r[0] for r in receivers) for h in range(model.cfg.n_heads)]
    name = "path patching into name-mover q"

    def fast():
        result = path_patch(model, batch, receivers=receivers, receiver_input="q", at="read", senders=senders)
        return torch.stack([result.values[s] for s in senders])

    naive = row(name, "naive", lambda: naive_path(model, batch, receivers, senders))
    with layer_resume_only():
        row(name, "layers only", fast, naive)
    row(name, "mechscope", fast, naive)

    if args.ioi:
        from mechscope.studies import Settings, run_ioi

        studies = {}

        def study(key, settings=Settings()):
            studies[key] = run_ioi(model, settings)
            return torch.tensor(studies[key]["faithfulness"])

        with layer_resume_only():
            before, t0 = row("IOI study (exact)", "layers only", lambda: study("layers"))
        after, t1 = row("IOI study (exact)", "mechscope", lambda: study("exact"))
        # the ratio column: the exact study's time over the screened one's; the difference: in faithfulness
        row("IOI study (--screen atp)", "mechscope", lambda: study("screen", Settings(screen="atp")), (after, t1))
        print(f"IOI study: {t0 / t1:.2f}x faster; faithfulness {before.item():.6f} -> {after.item():.6f}")
        exact, screened = ({h for heads in studies[k]["circuit"].values() for h in heads} for k in ("exact", "screen"))
        print(f"screen recall: {len(exact & screened)} of the exact study's {len(exact)} heads "
              f"({len(screened - exact)} others); same classes: {studies['exact']['circuit'] == studies['screen']['circuit']}")


def reset_peak() -> None:
    """Start a new peak-memory measurement (Linux: clear VmHWM; elsewhere the process's peak so far)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_gb() -> float:
    """The resident-memory peak since reset_peak(), in GB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1e6
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


if __name__ == "__main__":
    main()
