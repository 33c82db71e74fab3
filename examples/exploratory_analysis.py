"""Exploratory analysis of indirect object identification, the TransformerLens way, on SmolLM2.

TransformerLens's "Exploratory Analysis Demo" (Nanda) redone with mechscope on a Hugging Face model,
top to bottom: the logit difference, direct logit attribution by component and by head, the logit
lens, attention patterns, activation patching by layer x position and by head, attribution
patching, and path patching into the name movers, the step that finds the IOI circuit
(`mechscope ioi` runs the whole study and writes a report). Each step is written once with
TransformerLens's cache methods and, where mechscope has one, with its one-call function; the
script checks that the two agree.

    .venv/bin/python examples/exploratory_analysis.py                  # 16 prompts, every layer: minutes here
    .venv/bin/python examples/exploratory_analysis.py --layers 20 23 24  # patch only these layers: seconds

Steps:
1. Prompts: IOI sentences ("When Mary and John went to the store, John gave a drink to") with their
   ABC corruption (three other names), one template so that every prompt has the same length.
2. The logit difference " Mary" - " John" at the last position.
3. Direct logit attribution: the final residual stream as the sum of its parts, each through the
   final norm (with the scale it had) onto the logit-difference direction; by component, then by head.
4. The logit lens: the residual stream entering each layer, read by the final norm and unembedding.
5. Attention patterns of the top head: from the last token to the names.
6. Activation patching: the clean residual stream into the corrupt run, at each layer and position;
   then each head's output at every position.
7. Attribution patching: a first-order estimate of step 6's head table from one backward pass.
8. Path patching: which heads change the logit difference through the name movers' queries.
"""

from __future__ import annotations

import argparse

import torch

import mechscope
from mechscope.analysis import direct_logit_attribution, logit_lens
from mechscope.metrics import logit_diff, read_logits
from mechscope.patching import activation_patch, attribution_patch, path_patch
from mechscope.tasks import ContrastiveBatch, ioi
from mechscope.tasks.ioi import name_positions


def main(model: mechscope.HookedModel | None = None, n: int = 16, seed: int = 0,
         layers: list[int] | None = None) -> dict:
    """Run every step, print what it finds, and return the numbers (tests/real/test_examples.py reads
    them). `layers`: patch (steps 6 and 8) only these layers, not all of them."""
    torch.set_grad_enabled(False)
    model = model or mechscope.load_model("smollm2-135m")
    out: dict = {}

    # 1. Prompts, one template: equal lengths, so TransformerLens's pos_slice=-1 is the answer position.
    batch = ContrastiveBatch.from_records(model, ioi(n, seed=seed, model=model, templates=[0]))
    print(f"{len(batch)} prompts, e.g. {batch.clean_prompts[0]!r} -> {model.to_str_tokens(batch.answer[:1])[0]!r}")

    # 2. The logit difference.
    logits, cache = model.run_with_cache(batch.clean)  # logits [batch, pos, d_vocab]
    diff = logit_diff(read_logits(logits, batch), batch)  # [batch]
    out["logit_diff"] = diff.mean().item()
    print(f"\nlogit difference (answer - wrong): {out['logit_diff']:.3f}")

    # 3. Direct logit attribution, as TransformerLens writes it ...
    stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)  # [component, batch, d_model]
    per_component = cache.logit_attrs(stack, batch.answer, batch.wrong, pos_slice=-1).mean(-1)  # [component]
    # ... and as one call, which also gives each head. Over every component, the attributions add up
    # to the logit difference (less what the final norm's bias adds, none on SmolLM2).
    by_component = direct_logit_attribution(model, batch, by="component")
    out["dla_agree"] = (per_component - by_component.values).abs().max().item()
    out["dla_total"] = per_component.sum().item()
    print(f"direct logit attribution: components sum to {out['dla_total']:.3f}; the largest:")
    for i in per_component.abs().argsort(descending=True)[:4].tolist():
        print(f"  {labels[i]:>12}  {per_component[i].item():+.3f}")
    heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head = cache.logit_attrs(heads, batch.answer, batch.wrong, pos_slice=-1).mean(-1)  # [layer * head]
    by_head = direct_logit_attribution(model, batch)  # values [layer, head]
    out["head_dla_agree"] = (per_head - by_head.values.flatten()).abs().max().item()
    top_heads = per_head.argsort(descending=True)[:3].tolist()
    out["top_dla_heads"] = [head_labels[i] for i in top_heads]
    print("heads writing the answer most: " + ", ".join(f"{head_labels[i]} {per_head[i].item():+.2f}"
                                                        for i in top_heads))

    # 4. The logit lens: each layer's stream through the final norm (recomputed, as TransformerLens
    # does for the final layer) and the unembedding, projected on the logit-difference direction.
    accumulated, lens_labels = cache.accumulated_resid(layer=-1, apply_ln=True, pos_slice=-1, return_labels=True)
    direction = model.tokens_to_residual_directions(batch.answer) - model.tokens_to_residual_directions(batch.wrong)
    lens = (accumulated * direction).sum(-1).mean(-1)  # [layer + 1]
    out["lens_agree"] = (lens - logit_lens(model, batch).values).abs().max().item()
    out["lens_last"] = lens[-1].item()
    shown = list(range(0, len(lens) - 1, 6)) + [len(lens) - 1]
    print("logit lens: " + ", ".join(f"{lens_labels[i]} {lens[i].item():+.2f}" for i in shown))

    # 5. Attention of the top head, from the last token to the indirect object and the subject.
    where = name_positions(batch)  # {"IO", "S1", "S2", "END"} -> [batch]
    layer, head = (int(x) for x in out["top_dla_heads"][0][1:].split("H"))
    pattern = cache["pattern", layer][:, head]  # [batch, q_pos, k_pos]
    rows = torch.arange(len(batch))
    to_io = pattern[rows, where["END"], where["IO"]].mean().item()
    to_s = (pattern[rows, where["END"], where["S1"]] + pattern[rows, where["END"], where["S2"]]).mean().item()
    out["top_head_attention"] = {"IO": to_io, "S": to_s}
    print(f"L{layer}H{head} attends from the end to the indirect object {to_io:.2f}, to the subject {to_s:.2f}")

    # 6. Activation patching (clean into corrupt): by layer x position, then by head.
    resid = activation_patch(model, batch, site="resid_pre", per_position=True, layers=layers)  # [layer, pos]
    heads_exact = activation_patch(model, batch, site="head_z", layers=layers)  # values [layer, head]
    out["resid_top"] = resid.top(3)
    out["head_top"] = heads_exact.top(3)
    print("patching resid_pre, largest cells: " + ", ".join(f"layer {c['layer']} at {c['pos']!r} {v:+.2f}"
                                                           for c, v in resid.top(3)))
    print("patching head outputs: " + ", ".join(f"L{c['layer']}H{c['head']} {v:+.2f}" for c, v in heads_exact.top(3)))

    # 7. Attribution patching: one forward and backward for the whole head table.
    estimate = attribution_patch(model, batch, sites=["head_z"])["head_z"]  # every layer: one backward
    rows = [int(label) for label in heads_exact.labels["layer"]]
    a, b = estimate.values[rows].flatten(), heads_exact.values.flatten()
    out["atp_correlation"] = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    print(f"attribution patching against exact patching over {a.numel()} heads: correlation "
          f"{out['atp_correlation']:.2f}")

    # 8. Path patching: each earlier head's effect on the logit difference through the queries of the
    # top direct-effect heads (the name movers), at the last position: the S-inhibition heads show up.
    movers = [tuple(int(x) for x in label[1:].split("H")) for label in out["top_dla_heads"]]
    last = max(layer for layer, _ in movers)
    senders = None if layers is None else [(l, h) for l in layers if l < last for h in range(model.cfg.n_heads)]
    paths = path_patch(model, batch, receivers=movers, receiver_input="q", at="read", senders=senders)
    out["path_top"] = paths.top(3)
    print("through the name movers' queries: " + ", ".join(f"L{c['layer']}H{c['head']} {v:+.2f}"
                                                          for c, v in paths.top(3)))
    print("\nThe whole study, with every class of head and a report: mechscope ioi --model smollm2-135m")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16, help="IOI prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, nargs="*", help="patch only these layers (default: all)")
    args = parser.parse_args()
    main(n=args.n, seed=args.seed, layers=args.layers)
