"""Circuit discovery: EAP, EAP-IG and ACDC on SmolLM2 with IOI prompts, and EAP against
TransformerLens 4.3's edge attribution on a GPT-2-shaped model with random weights, in one run.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'    # TransformerLens, once
    .venv/bin/python benchmarks/discovery.py [--model smollm2-135m] [--n 24] [--acdc-top 2000] [--skip acdc tl]

For each method: wall time (the clean and ablated runs it records included) as a multiple of one
plain forward of the same batch, peak memory (each method in a fresh process: resident set on CPU,
allocated memory on a GPU), and its faithfulness curves (circuits ranked by |score| and by signed
score). ACDC runs on the top `--acdc-top` EAP-IG edges (its time excludes EAP-IG's; its peak
includes it). Then TransformerLens: both tools score every edge of the same random GPT-2-shaped model
on the same token ids; time ratio and max abs difference of the edge scores (TL scores per position;
summed over positions they are ours).

`--model llama-1b-shape` times EAP and EAP-IG on a model of Llama-3.2-1B's shape (2048 wide, 16
layers, 32 query and 8 key/value heads; SmolLM2's vocabulary) with random weights: where memory
becomes the limit (no curves: its circuits mean nothing). Run it with `--skip acdc tl`.
`--model smollm2-shape` is SmolLM2-135M's shape with random weights, for a machine without the zoo
(a GPU's; `--tokenizer DIR` gives the tokenizer files).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

METHODS = ("eap", "eap-ig", "acdc")
SHAPES = {"llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
          "smollm2-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)}


def setup(args):
    from mechscope import HookedModel, load_model
    from mechscope.tasks import ContrastiveBatch, ioi

    if args.model in SHAPES:  # random weights, SmolLM2's tokenizer (and so its IOI names)
        from transformers import LlamaConfig, LlamaForCausalLM

        if args.tokenizer:  # a folder with SmolLM2's tokenizer files: where the zoo's weights cannot go
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        else:
            tokenizer = load_model("smollm2-135m").tokenizer
        torch.manual_seed(args.seed)
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **SHAPES[args.model])).eval().to(args.device)
        model = HookedModel(hf, tokenizer)
    else:
        model = load_model(args.model, device=args.device)
    batch = ContrastiveBatch.from_records(model, ioi(args.n, seed=args.seed, model=model))
    return model, batch


def peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args, method: str) -> dict:
    """Child process: one method, timed, with its curve."""
    from mechscope.discovery import Evaluator, Graph, discover
    from mechscope.discovery.run import _plain_forward_seconds

    model, batch = setup(args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    forward = _plain_forward_seconds(model, batch)
    graph = Graph.from_model(model)
    extra = {}
    if method == "acdc":
        ev = Evaluator(model, batch, graph, gradients=True)
        ig = discover(model, batch, method="eap-ig", evaluator=ev)
        candidates = ig.circuit(edges=args.acdc_top, prune=False).mask
        sync()
        start = time.perf_counter()
        scores = discover(model, batch, method="acdc", threshold=args.threshold, candidates=candidates, evaluator=ev)
        sync()
        seconds = time.perf_counter() - start
        extra = {"kept": len(scores.circuit_edges), "candidates": args.acdc_top, "threshold": args.threshold}
    else:
        sync()
        start = time.perf_counter()
        ev = Evaluator(model, batch, graph, gradients=True)  # the clean recording is EAP's gradient pass
        scores = discover(model, batch, method=method, evaluator=ev)
        sync()
        seconds = time.perf_counter() - start
    empty = {"sizes": [], "faithfulness": [], "area": float("nan")}
    curve, signed = (empty, empty) if args.model in SHAPES else (ev.curve(scores), ev.curve(scores, signed=True))
    return {"method": method, "seconds": seconds, "forward": forward, "peak_mib": peak_mib(args.device),
            "sizes": curve["sizes"], "faithfulness": curve["faithfulness"], "area": curve["area"],
            "faithfulness_signed": signed["faithfulness"], "area_signed": signed["area"],
            "n_edges": graph.n_edges, **extra}


def transformer_lens(args) -> dict:
    """EAP on a random GPT-2-shaped model: TransformerLens 4.3 against mechscope, the same token ids."""
    import copy
    import tempfile

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    from mechscope import HookedModel
    from mechscope.discovery import discover
    from mechscope.tasks import ContrastiveBatch

    model, batch = setup(args)  # its IOI token ids, one template (equal lengths: TL needs them)
    n_pos = batch.clean.shape[1]
    same = (batch.read_pos == n_pos - 1)
    clean, corrupt = batch.clean[same][:args.tl_n].cpu(), batch.corrupt[same][:args.tl_n].cpu()
    cfg = GPT2Config(n_layer=args.tl_layers, n_head=12, n_embd=768, n_positions=max(64, n_pos), vocab_size=model.cfg.d_vocab)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(cfg).eval()
    ours_hf = copy.deepcopy(hf)  # the bridge wraps the modules of the object it is given
    folder = tempfile.mkdtemp()
    cfg.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok)
    answer, wrong = int(batch.answer[0]), int(batch.wrong[0])

    def metric_fn(logits):  # one example's logits
        return logits[0, -1, answer] - logits[0, -1, wrong]

    with torch.enable_grad():
        start = time.perf_counter()
        tl = attribution_patch(bridge, clean, corrupt, metric_fn, EdgeAttributionConfig(granularity="edge"))
        tl_seconds = time.perf_counter() - start
    ours_model = HookedModel(ours_hf, tok)
    k = len(clean)
    # TL linearizes at its corrupt run and patches toward clean: ours ablates its "clean" toward its
    # "corrupt", so the roles swap; the metric and the answer are the same for every prompt.
    swapped = ContrastiveBatch(clean=corrupt, corrupt=clean, answer=torch.full((k,), answer),
                               wrong=torch.full((k,), wrong), read_pos=torch.full((k,), n_pos - 1),
                               clean_prompts=("",) * k, corrupt_prompts=("",) * k)
    start = time.perf_counter()
    ours = discover(ours_model, swapped, method="eap")
    ours_seconds = time.perf_counter() - start
    theirs = torch.zeros(ours.values.shape[0], dtype=torch.float64)
    index = ours.graph.edge_index
    for (w, r), v in tl.edge_scores.items():
        theirs[index[f"{_tl_name(w)}->{_tl_name(r)}"]] += float(v)
    diff = (ours.values - theirs).abs().max().item()
    return {"tl_seconds": tl_seconds, "ours_seconds": ours_seconds, "ratio": tl_seconds / ours_seconds,
            "max_abs_diff": diff, "max_abs_score": theirs.abs().max().item(), "n_edges": ours.values.shape[0],
            "prompts": k, "layers": args.tl_layers}


def _tl_name(node) -> str:
    kind = node.kind
    if kind == "embed":
        return "input"
    if kind == "attn_head_out":
        return f"a{node.layer}.h{node.head}"
    if kind == "mlp_out" or kind == "mlp_in":
        return f"m{node.layer}"
    if kind == "logits":
        return "logits"
    return f"a{node.layer}.h{node.head}<{kind[0]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=24, help="IOI prompts (every template: mixed lengths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", help="with a --model shape: SmolLM2's tokenizer from this folder, not the zoo")
    p.add_argument("--acdc-top", type=int, default=2000)
    p.add_argument("--threshold", type=float, default=0.02, help="ACDC's threshold on the logit difference")
    p.add_argument("--tl-n", type=int, default=8, help="prompts for the TransformerLens comparison")
    p.add_argument("--tl-layers", type=int, default=12, help="layers of the random GPT-2-shaped model")
    p.add_argument("--skip", nargs="*", default=[], choices=[*METHODS, "tl"])
    p.add_argument("--only", choices=[*METHODS, "tl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    if args.only:
        print(json.dumps(transformer_lens(args) if args.only == "tl" else run_one(args, args.only)))
        return
    print(f"{args.model}, {args.n} IOI prompts, device {args.device}")
    rows = []
    for method in [m for m in (*METHODS, "tl") if m not in args.skip]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", method]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{method}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if method == "tl":
            print(f"\nEAP on a random GPT-2-shaped model ({r['layers']} layers, {r['n_edges']} edges, {r['prompts']} "
                  f"prompts): TransformerLens 4.3 {r['tl_seconds']:.1f} s, mechscope {r['ours_seconds']:.2f} s, "
                  f"{r['ratio']:.1f}x faster; max abs difference of edge scores {r['max_abs_diff']:.2e} "
                  f"(largest score {r['max_abs_score']:.2e})")
            continue
        rows.append(r)
        extra = f", kept {r['kept']} of {r['candidates']} (threshold {r['threshold']})" if method == "acdc" else ""
        print(f"{method:7s} {r['seconds']:7.1f} s = {r['seconds'] / r['forward']:6.1f} plain forwards "
              f"({r['forward']:.2f} s), peak {r['peak_mib']:7.0f} MiB, curve area {r['area']:.3f} "
              f"(signed {r['area_signed']:.3f}){extra}")
    if rows and rows[0]["sizes"]:
        print("\nfaithfulness at circuit size (top N edges, pruned), ranked by |score| / by signed score:")
        print("size    " + " ".join(f"{m['method'] + ' |s|':>12s} {m['method'] + ' signed':>12s}" for m in rows))
        for i, size in enumerate(rows[0]["sizes"]):
            print(f"{size:<7d} " + " ".join(f"{m['faithfulness'][i]:12.3f} {m['faithfulness_signed'][i]:12.3f}"
                                             for m in rows))


if __name__ == "__main__":
    main()
