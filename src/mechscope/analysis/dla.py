"""Direct logit attribution and the logit lens, on the logit difference answer - wrong.

Direct logit attribution: each component's write to the residual stream, passed through the final
norm with the scale it had on this forward (`ActivationCache.apply_ln_to_stack`), projected on the
unembedding direction W_U[:, answer] - W_U[:, wrong] at each prompt's read position. Over a full
decomposition (embeddings, every attention and MLP output) the parts add up to the logit
difference, less the final norm's bias.

The logit lens reads the residual stream before each layer as if it were the last: the model's own
final norm and unembedding, applied to it.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from mechscope.analysis.heads import head_labels
from mechscope.metrics import at_positions, widen
from mechscope.models.hooked import HookedModel, technique
from mechscope.result import Result
from mechscope.tasks.batch import ContrastiveBatch


def _direction(model: HookedModel, batch: ContrastiveBatch) -> Tensor:
    """W_U[:, answer] - W_U[:, wrong] per prompt: [batch, d_model]."""
    return (model.W_U[:, batch.answer] - model.W_U[:, batch.wrong]).T


@technique
def direct_logit_attribution(
    model: HookedModel, batch: ContrastiveBatch, *, by: str = "head", run: str = "clean", chunk: int | None = None
) -> Result:
    """Each head's (by="head": axes layer x head) or each component's (by="component": embed,
    {l}_attn_out, {l}_mlp_out) direct effect on the logit difference, averaged over prompts.
    `chunk`: cache this many prompts at a time, not all (less memory, the same values; hooks the
    caller added then see `chunk` prompts at a time)."""
    start = time.perf_counter()
    chunk = len(batch) if chunk is None else chunk
    if by not in ("head", "component") or run not in ("clean", "corrupt") or chunk < 1:
        raise ValueError(f"by must be 'head' or 'component', run 'clean' or 'corrupt' and chunk at least 1; "
                         f"got {by!r}, {run!r}, {chunk}")
    wanted = ("hook_z", "hook_attn_out", "hook_mlp_out", "hook_embed", "hook_pos_embed", "hook_scale")
    parts = []
    for first in range(0, len(batch), chunk):
        part = batch.rows(first, first + chunk)
        tokens = part.clean if run == "clean" else part.corrupt
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(wanted))
            stack, labels = (cache.stack_head_results if by == "head" else cache.decompose_resid)(
                return_labels=True, apply_ln=True, positions=part.read_pos)  # [component, part, d_model]
            parts.append((stack * _direction(model, part)).sum(-1))  # [component, part]
        del cache, stack
    per_prompt = torch.cat(parts, -1)  # [component, batch]
    values = widen(per_prompt).mean(-1)
    if by == "head":
        values = values.reshape(model.cfg.n_layers, model.cfg.n_heads)
        axes, label_map = ("layer", "head"), head_labels(model)
    else:
        axes, label_map = ("component",), {"component": labels}
    return Result(values=values, axes=axes, labels=label_map, technique=f"dla ({run})", model=model.cfg.model_name,
                  n_prompts=len(batch), seconds=time.perf_counter() - start)


@technique
def logit_lens(model: HookedModel, batch: ContrastiveBatch, *, run: str = "clean") -> Result:
    """The logit difference read from the residual stream before each layer (and after the last)
    through the model's own final norm and unembedding, averaged over prompts: axes (layer,)."""
    start = time.perf_counter()
    tokens = batch.clean if run == "clean" else batch.corrupt
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_resid_post")))
        stack, labels = cache.accumulated_resid(return_labels=True)  # [layer + 1, batch, pos, d_model]
        logits = model.logits_from_resid(at_positions(stack, batch.read_pos))  # [layer + 1, batch, d_vocab]
        index = torch.arange(len(batch))
        diff = logits[:, index, batch.answer] - logits[:, index, batch.wrong]  # [layer + 1, batch]
    return Result(values=widen(diff).mean(-1), axes=("layer",), labels={"layer": labels},
                  technique=f"logit lens ({run})", model=model.cfg.model_name, n_prompts=len(batch),
                  seconds=time.perf_counter() - start)
