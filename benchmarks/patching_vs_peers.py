"""Exact patching of every head's output (hook_z, all positions, denoising), mechscope against its
peers, in one run on one Hugging Face model object:

- TransformerLens: `patching.get_act_patch_attn_head_out_all_pos` on a TransformerBridge booted
  from the same model object (one full forward per head);
- nnsight: a loop of traces, one per head, writing the clean head's slice of `o_proj`'s input.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'    # the peers, once
    .venv/bin/python benchmarks/patching_vs_peers.py [--model smollm2-135m] [--n 8] [--skip nnsight]

Prints each time, the ratios, and the largest difference from mechscope's values.
"""

from __future__ import annotations

import time

import torch

from common import ioi_setup, tl_bridge, tl_exact_head_z
from mechscope.metrics import logit_diff, read_logits
from mechscope.patching import activation_patch


def run_transformer_lens(model, batch) -> torch.Tensor:
    return tl_exact_head_z(tl_bridge(model), batch)


def run_nnsight(model, batch) -> torch.Tensor:
    from nnsight import LanguageModel

    lm = LanguageModel(model.hf, tokenizer=model.tokenizer)
    cfg, d = model.cfg, model.cfg.d_head
    proj = lambda layer: lm.model.layers[layer].self_attn.o_proj  # noqa: E731 - Llama layout
    clean_z = []
    with lm.trace(batch.clean):  # nnsight runs the block's own code: no comprehension inside it
        for layer in range(cfg.n_layers):
            clean_z.append(proj(layer).input.save())
    with lm.trace(batch.corrupt):
        corrupt_logits = lm.output.logits.save()
    corrupt_ld = logit_diff(read_logits(corrupt_logits, batch), batch).mean()
    out = torch.zeros(cfg.n_layers, cfg.n_heads)
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            cols = slice(head * d, (head + 1) * d)
            with lm.trace(batch.corrupt):
                proj(layer).input[:, :, cols] = clean_z[layer][:, :, cols]
                logits = lm.output.logits.save()
            out[layer, head] = logit_diff(read_logits(logits, batch), batch).mean() - corrupt_ld
    return out


def main() -> None:
    args, model, batch = ioi_setup(__doc__, ["transformer_lens", "nnsight"])
    start = time.perf_counter()
    model(batch.corrupt)
    forward = time.perf_counter() - start
    print(f"{model}\n{len(batch)} IOI prompts of {batch.clean.shape[1]} tokens; one plain forward {forward:.2f} s")

    start = time.perf_counter()
    ours = activation_patch(model, batch, site="head_z").values
    times = {"mechscope": time.perf_counter() - start}
    results = {}
    peers = {"transformer_lens": run_transformer_lens, "nnsight": run_nnsight}
    for name, run in peers.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        results[name] = run(model, batch).float()
        times[name] = time.perf_counter() - start

    print(f"\n{'method':<18} {'seconds':>8} {'x mechscope':>12} {'forwards':>9} {'max |diff|':>11}")
    for name, t in times.items():
        diff = "-" if name == "mechscope" else f"{(results[name] - ours).abs().max().item():.2e}"
        print(f"{name:<18} {t:>8.1f} {t / times['mechscope']:>12.2f} {t / forward:>9.1f} {diff:>11}")
    print(f"\n{model.cfg.n_layers * model.cfg.n_heads} heads; 'forwards' = time / one plain forward of the batch")


if __name__ == "__main__":
    main()
