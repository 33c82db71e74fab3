"""What the benchmarks share: the command line and IOI batch, best-of timing, and TransformerLens's
exact head_z sweep on a TransformerBridge over the very same Hugging Face model object."""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import torch

from mechscope import load_model
from mechscope.metrics import logit_diff, read_logits
from mechscope.models import zoo
from mechscope.tasks import ContrastiveBatch, ioi


def ioi_setup(doc: str, skip: list[str]):
    """(args, model, batch): parse --model, --n, --seed and --skip, load the model, build the batch."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a zoo alias (the peers boot from its files)")
    p.add_argument("--n", type=int, default=8, help="IOI prompts (one template: equal lengths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=skip)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    batch = ContrastiveBatch.from_records(model, ioi(args.n, seed=args.seed, model=model, templates=[0]))
    return args, model, batch


def timed(fn, repeats: int = 1):
    """(result, best wall time of `repeats` runs): the first run of a backward pays warm-up."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def tl_bridge(model):
    """A TransformerBridge on a copy of the model's HF object (config from the zoo files, the same
    weights): the bridge replaces the modules of the object it boots on with its own wrappers, so it
    must never share mechscope's (mechscope refuses to hook a rewired model)."""
    import copy

    from transformer_lens.model_bridge import TransformerBridge

    source = zoo.model_dir(model.cfg.model_name) / "hf"  # its config.json; weights come from hf_model
    return TransformerBridge.boot_transformers(str(source), hf_model=copy.deepcopy(model.hf), tokenizer=model.tokenizer)


def tl_exact_head_z(bridge, batch) -> torch.Tensor:
    """TransformerLens's exact sweep: one full forward per head, the clean z into the corrupt run."""
    from transformer_lens import patching

    _, clean_cache = bridge.run_with_cache(batch.clean)
    corrupt_ld = logit_diff(read_logits(bridge(batch.corrupt), batch), batch).mean()

    def metric(logits):
        return logit_diff(read_logits(logits, batch), batch).mean() - corrupt_ld

    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar, one line per head
        return patching.get_act_patch_attn_head_out_all_pos(bridge, batch.corrupt, clean_cache, metric)
