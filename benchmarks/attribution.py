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

import torch

from common import ioi_setup, timed, tl_bridge, tl_exact_head_z
from mechscope.patching import activation_patch, attribution_patch
from mechscope.patching.diagnostics import compare

HEAD_SITES = ("head_z", "head_q", "head_k", "head_v", "head_pattern", "head_result")


def transformer_lens_runs(model, batch, skip):
    """(seconds of TL's exact head_z sweep or None, seconds of TL's AtP, its per-head scores)."""
    from transformer_lens.tools.analysis import attribution_patching as tl_atp

    bridge = tl_bridge(model)
    exact_seconds = None
    if "tl_exact" not in skip:
        _, exact_seconds = timed(lambda: tl_exact_head_z(bridge, batch))

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
    args, model, batch = ioi_setup(__doc__, ["tl_exact", "transformer_lens"])
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
