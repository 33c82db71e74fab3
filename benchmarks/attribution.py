"""Attribution patching (AtP, AtP*) on every head site, against exact patching and TransformerLens,
in one run on one Hugging Face model object.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'    # the peers, once
    .venv/bin/python benchmarks/attribution.py [--model smollm2-135m] [--n 8] [--skip tl_exact]

Prints wall times as multiples of one plain forward of the batch, the ratios to mechscope's exact
engine, to TransformerLens's one-forward-per-head sweep (head_z) and to its own attribution
patching (node granularity, one prompt pair at a time), and each site's agreement with exact.
Attribution methods take the best of 3 runs (the first backward pays a warm-up); exact sweeps run once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import torch

from mechscope import load_model
from mechscope.metrics import logit_diff, read_logits
from mechscope.models import zoo
from mechscope.patching import activation_patch, attribution_patch
from mechscope.patching.diagnostics import compare
from mechscope.tasks import ContrastiveBatch, ioi

HEAD_SITES = ("head_z", "head_q", "head_k", "head_v", "head_pattern", "head_result")


def timed(fn, repeats: int = 1):
    """(result, best wall time of `repeats` runs): the first run of a backward pays warm-up."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def transformer_lens_runs(model, batch, skip):
    """(seconds of TL's exact head_z sweep or None, seconds of TL's AtP, its per-head scores)."""
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis import attribution_patching as tl_atp

    source = zoo.model_dir(model.cfg.model_name) / "hf"  # its config.json; weights come from hf_model
    bridge = TransformerBridge.boot_transformers(str(source), hf_model=model.hf, tokenizer=model.tokenizer)
    exact_seconds = None
    if "tl_exact" not in skip:
        def sweep():
            _, clean_cache = bridge.run_with_cache(batch.clean)
            base = logit_diff(read_logits(bridge(batch.corrupt), batch), batch).mean()
            metric = lambda logits: logit_diff(read_logits(logits, batch), batch).mean() - base  # noqa: E731
            with contextlib.redirect_stderr(io.StringIO()):
                return patching.get_act_patch_attn_head_out_all_pos(bridge, batch.corrupt, clean_cache, metric)
        _, exact_seconds = timed(sweep)

    def atp():  # its loop is one pair at a time anyway; each pair gets its own answer
        scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
        for i in range(len(batch)):
            a, w, p = batch.answer[i], batch.wrong[i], batch.read_pos[i]
            metric = lambda logits, a=a, w=w, p=p: logits[0, p, a] - logits[0, p, w]  # noqa: E731
            with torch.enable_grad():
                result = tl_atp.attribution_patch(bridge, batch.clean[i:i + 1], batch.corrupt[i:i + 1], metric)
            for node, score in result.node_scores.items():
                if node.kind == "attn_head_out":
                    scores[node.layer, node.head] += score / len(batch)
        return scores
    tl_scores, atp_seconds = timed(atp, repeats=3)
    return exact_seconds, atp_seconds, tl_scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a zoo alias (TransformerLens boots from its files)")
    p.add_argument("--n", type=int, default=8, help="IOI prompts (one template: equal lengths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["tl_exact", "transformer_lens"])
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    batch = ContrastiveBatch.from_records(model, ioi(args.n, seed=args.seed, model=model, templates=[0]))
    model(batch.corrupt)  # warm up
    forward = timed(lambda: model(batch.corrupt), repeats=7)[1]  # the best of 7: robust to load
    print(f"{model}\n{len(batch)} IOI prompts of {batch.clean.shape[1]} tokens; one plain forward {forward:.3f} s\n")

    sites = list(HEAD_SITES)
    atp, t_atp = timed(lambda: attribution_patch(model, batch, sites=sites), repeats=3)
    star, t_star = timed(lambda: attribution_patch(model, batch, sites=sites, method="atp*"), repeats=3)
    _, t_star_qk = timed(lambda: attribution_patch(model, batch, sites=sites, method="atp*", graddrop=False), repeats=3)
    exact, t_exact = {}, {}
    for site in sites:
        exact[site], t_exact[site] = timed(lambda site=site: activation_patch(model, batch, site=site))
    total_exact = sum(t_exact.values())

    rows = [("AtP, all 6 head sites", t_atp), ("AtP* (QK fix + GradDrop)", t_star),
            ("AtP* (QK fix only)", t_star_qk), ("mechscope exact, 6 sites", total_exact),
            ("mechscope exact, head_z", t_exact["head_z"])]
    tl_scores = None
    if "transformer_lens" not in args.skip:
        tl_exact, tl_atp_seconds, tl_scores = transformer_lens_runs(model, batch, args.skip)
        if tl_exact is not None:
            rows.append(("TransformerLens exact, head_z", tl_exact))
        rows.append(("TransformerLens AtP (node)", tl_atp_seconds))
    print(f"{'method':<32} {'seconds':>8} {'forwards':>9} {'AtP is x faster':>16}")
    for name, seconds in rows:
        print(f"{name:<32} {seconds:>8.2f} {seconds / forward:>9.1f} {seconds / t_atp:>16.1f}")

    print("\nagreement with exact patching (pearson, spearman, sign, top-10 overlap):")
    for site in sites:
        a, s = compare(atp[site], exact[site]), compare(star[site], exact[site])
        print(f"  {site:<13} AtP:  {a}\n  {'':<13} AtP*: {s}")
    if tl_scores is not None:
        ours = atp["head_z"].values.flatten()
        print(f"\nTransformerLens AtP vs mechscope AtP on head_z: max |diff| "
              f"{(tl_scores.flatten() - ours).abs().max().item():.2e}; vs exact: "
              f"pearson {compare(atp['head_z'].__class__(**{**atp['head_z'].__dict__, 'values': tl_scores}), exact['head_z']).pearson:.3f}")


if __name__ == "__main__":
    main()
