"""What a report shows, as a list of views for report.js: the IOI study (`ioi_views`) and a single
patching or attribution result (`result_views`)."""

from __future__ import annotations

import math

COLOURS = {
    "name_mover": "#d62728", "negative_name_mover": "#9467bd", "backup_name_mover": "#ff7f0e",
    "s_inhibition": "#2ca02c", "induction": "#1f77b4", "duplicate_token": "#17becf", "previous_token": "#8c564b",
    "logits": "#1d2330",
}


def _grid(result: dict) -> tuple[list, list, list]:
    """(rows, cols, values) of a 1-, 2- or 3-axis result dict; a third axis is averaged away."""
    axes, labels, values = result["axes"], result["labels"], result["values"]
    if len(axes) == 1:
        return ["all"], labels[axes[0]], [values]
    if len(axes) == 3:
        values = [[_mean(cell) for cell in row] for row in values]
    return labels[axes[0]], labels[axes[1]], values


def _mean(xs: list) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def heatmap(result: dict, title: str, *, note: str = "", diverging: bool = True) -> dict:
    rows, cols, values = _grid(result)
    axes = result["axes"]
    return {"title": title, "rows": rows, "cols": cols, "values": values, "note": note, "diverging": diverging,
            "rowTitle": axes[0] if len(axes) > 1 else "", "colTitle": axes[-1] if len(axes) < 3 else axes[1],
            "heads": tuple(axes[:2]) == ("layer", "head")}


def ioi_views(d: dict) -> list[dict]:
    inter = d["intermediate"]
    paper = d.get("paper_circuit")
    c = d.get("completeness") or {}
    views = [{"type": "summary", "title": "Summary", "items": [
        ["model", d["model"]], ["prompts", f"{d['n_prompts']} ({d['n_path_prompts']} for path patching)"],
        ["F(M): logit difference", f"{d['logit_diff']:.3f}"], ["F(C): circuit only", f"{d['circuit_logit_diff']:.3f}"],
        ["faithfulness F(C)/F(M)", f"{d['faithfulness']:.3f}"],
        ["completeness gap", f"{c['gap']:.3f} ({c['relative']:.0%} of F(M))" if c else "n/a"],
        ["heads in circuit", f"{d['n_circuit_heads']} of {d['n_model_heads']}"],
        ["time", f"{d['seconds']:.0f} s"]]}]

    views.append(_graph(d))
    rows = [[cls, " ".join(heads) or "-"] + ([" ".join(paper[cls])] if paper else []) for cls, heads in d["circuit"].items()]
    views.append({"type": "table", "title": "The circuit by class", "rows": rows,
                  "columns": ["class", "heads found"] + (["Wang et al. 2022 (GPT-2 small)"] if paper else []),
                  "note": "Each head passed the test of its class (evidence below)."})

    maps = [heatmap(inter["dla"], "Direct logit attribution per head (IO - S)",
                    note="Each head's write at END, through the final norm, on the logit difference. Click a head to see its attention.")]
    if "dla_without_name_movers" in inter:
        maps.append(heatmap(inter["dla_without_name_movers"], "DLA with the name movers knocked out"))
    names = {"path_to_name_mover_queries": "Path patching into the name movers' queries",
             "path_to_s_inhibition_values": "Path patching into the S-inhibition heads' values",
             "path_to_induction_keys": "Path patching into the induction heads' keys"}
    screen = d.get("screen") or {}
    for key, title in names.items():
        if key in inter:
            maps.append(heatmap(inter[key], title, note="Change in logit difference when the sender is patched to "
                                "its ABC value along this path only (grey: not a sender" +
                                (", or not path-patched: see the screen below)." if key in screen else ").")))
    for key, title in (("attention_end_to_IO", "Attention END -> IO"), ("attention_end_to_S1", "Attention END -> S1"),
                       ("attention_end_to_S2", "Attention END -> S2"), ("copy_score", "OV copy score"),
                       ("negative_copy_score", "OV negative copy score"), ("induction_score", "Induction score"),
                       ("duplicate_token_score", "Duplicate-token score"), ("previous_token_score", "Previous-token score")):
        if key in inter:
            maps.append(heatmap(inter[key], title, diverging=False))
    found = [tuple(int(x) for x in h.split(".")) for heads in d["circuit"].values() for h in heads]
    for m in maps:
        m["marks"] = [[m["rows"].index(str(l)), h] for l, h in found if str(l) in m["rows"]]
    views.append({"type": "heatmaps", "title": "Heads (layer x head)", "maps": maps,
                  "note": "Choose a map; click a cell to show that head's attention pattern. Outlined: the circuit's heads."})

    if "resid_pre_by_position" in inter:
        flow = inter["resid_pre_by_position"]
        views.append({"type": "heatmaps", "title": "Residual stream patching (layer x position)", "maps": [
            heatmap(flow, "resid_pre, clean into ABC, per position",
                    note=f"Exact activation patching on {flow['n_prompts']} prompts of one template, e.g. "
                         f"\u201c{flow['prompts'][0]}\u201d: where the information that decides IO sits, layer by layer.")]})
    if "attention_patterns" in d:
        views.append({"type": "attention", "title": "Attention patterns", "patterns": d["attention_patterns"],
                      "note": "Choose a prompt, layer and head; hover a cell for its weight."})

    evidence = [[head, e["class"], ", ".join(f"{k} {_short(v)}" for k, v in e.items() if k != "class")]
                for head, e in sorted(d["evidence"].items(), key=lambda x: x[1]["class"])]
    views.append({"type": "table", "title": "Evidence per head", "columns": ["head", "class", "measurements"],
                  "rows": evidence})
    minimal = [[h, m["class"], m["score"], m["relative"], m["K"]] for h, m in d["minimality"].items()]
    views.append({"type": "table", "title": "Minimality", "rows": minimal,
                  "columns": ["head", "class", "|F(C\\(K+v)) - F(C\\K)|", "relative to F(C)", "K"],
                  "note": "K: none, or the rest of the head's class."})
    if screen:
        rows = [[names.get(key, key), x["senders"], f"{x['checked']} + {x['sampled']} sampled",
                 " ".join(x["sampled_below_tau"]) or "none", x["sample_largest_effect"], x["largest_estimate_error"],
                 "n/a" if x["largest_unchecked_estimate"] is None else x["largest_unchecked_estimate"]]
                for key, x in screen.items()]
        views.append({"type": "table", "title": "What the screen path-patched (--screen atp)", "rows": rows,
                      "columns": ["step", "senders", "path-patched", "sampled below -tau (missed by the ranking)",
                                  "largest |effect| sampled", "largest |exact - estimate|", "largest unchecked |estimate|"],
                      "note": "Path attribution ranked the senders by |estimate|; the top ones and a random sample of "
                              "the rest were path-patched exactly. Only those can join the circuit."})
    if c:
        tried = [[", ".join(t["removed"]) or "(none)", t["circuit"], t["model"], t["gap"]] for t in c["tried"]]
        views.append({"type": "table", "title": "Completeness: class subsets K tried", "rows": tried,
                      "columns": ["K", "F(C\\K)", "F(M\\K)", "gap"]})
    return views


def _short(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _graph(d: dict) -> dict:
    """Heads grouped by layer and coloured by class; edges from the study's per-receiver path patching
    and from the output heads to the logits (their DLA)."""
    n_layers = len(d["intermediate"]["dla"]["values"])
    nodes, edges = [], []
    by_class = {cls: heads for cls, heads in d["circuit"].items()}
    for cls, heads in by_class.items():
        for h in heads:
            layer, head = (int(x) for x in h.split("."))
            nodes.append({"id": h, "layer": layer, "head": head, "cls": cls,
                          "info": ", ".join(f"{k} {_short(v)}" for k, v in d["evidence"].get(h, {}).items() if k != "class")})
    nodes.sort(key=lambda n: (n["layer"], n["head"]))
    nodes.append({"id": "out", "layer": n_layers, "cls": "logits", "info": "the logits"})
    inter = d["intermediate"]
    for e in d.get("edges", []):
        edges.append({"source": e["source"], "target": e["target"], "value": e["effect"], "kind": "path",
                      "label": f"path patching through {e['via']}"})
    dla = inter["dla"]["values"]
    for cls in ("name_mover", "negative_name_mover", "backup_name_mover"):
        for h in by_class.get(cls, []):
            l, hh = (int(x) for x in h.split("."))
            edges.append({"source": h, "target": "out", "value": dla[l][hh], "kind": "direct",
                          "label": "direct logit attribution"})
    return {"type": "graph", "title": "The circuit", "nodes": nodes, "edges": edges, "colours": COLOURS,
            "layerLabels": {str(n_layers): "logits"},
            "note": "Heads by layer, coloured by class. Edges: a sender's path-patching effect through one "
                    "receiver, and the output heads' direct effect on the logits (width: size, relative within "
                    "each kind). Hover for numbers; click a head for its attention."}


def result_views(r: dict) -> list[dict]:
    """A patching or attribution result: summary, heatmap, top components, and exact against
    attribution where the result carries both."""
    items = [["model", r["model"]], ["technique", r["technique"]], ["prompts", str(r["n_prompts"])],
             ["time", f"{r['seconds']:.1f} s"]]
    for key in ("site", "metric", "direction", "clean_metric", "corrupt_metric"):
        if key in r and r[key] is not None:
            items.append([key.replace("_", " "), _short(r[key])])
    views = [{"type": "summary", "title": "Summary", "items": items}]
    maps = [heatmap(r, f"{r['technique']}: {r.get('site', '')}",
                    note="Averaged over positions." if len(r["axes"]) == 3 else "")]
    if len(r["axes"]) == 3:  # per position: one map per head-or-layer row is too many; show (layer, pos) too
        rows, cols = r["labels"][r["axes"][0]], r["labels"][r["axes"][2]]
        values = [[_mean([row[j][p] for j in range(len(row))]) for p in range(len(cols))] for row in r["values"]]
        maps.append({"title": f"{r['axes'][0]} x {r['axes'][2]} (mean over {r['axes'][1]})", "rows": rows,
                     "cols": cols, "values": values, "rowTitle": r["axes"][0], "colTitle": r["axes"][2],
                     "diverging": True, "heads": False})
    views.append({"type": "heatmaps", "title": "Effects", "maps": maps})
    views.append({"type": "table", "title": "Top components", "columns": [*r["axes"], "effect"],
                  "rows": [[*labels, value] for labels, value in _top(r, 15)]})
    verify = r.get("extra", {}).get("verify")
    if verify and (verify.get("top") or verify.get("sample")):
        points = verify.get("top", []) + verify.get("sample", [])
        xs, ys = [p["exact"] for p in points], [p["estimate"] for p in points]
        labels = [" ".join(f"{a} {v}" for a, v in p["component"].items()) for p in points]
        views.append({"type": "scatter", "title": "Exact patching against attribution", "x": xs, "y": ys,
                      "labels": labels, "xTitle": "exact", "yTitle": r["technique"],
                      "note": f"{len(xs)} components re-measured exactly (the top {len(verify.get('top', []))} "
                              f"and a random sample of the rest): Pearson r {_short(_pearson(xs, ys))}, same sign "
                              f"{sum((x > 0) == (y > 0) for x, y in zip(xs, ys)) / len(xs):.0%}; largest exact effect "
                              f"missed by the ranking {_short(verify.get('max_missed'))}. On the diagonal, the "
                              "estimate is exact."})
    return views


def _pearson(xs: list[float], ys: list[float]) -> float:
    import torch

    return torch.corrcoef(torch.tensor([xs, ys], dtype=torch.float64))[0, 1].item() if len(xs) > 1 else float("nan")


def _top(r: dict, k: int) -> list[tuple[list[str], float]]:
    cells = []

    def walk(values, labels):
        if isinstance(values, list):
            axis = r["axes"][len(labels)]
            for i, v in enumerate(values):
                walk(v, labels + [r["labels"][axis][i]])
        elif values is not None and not math.isnan(values):
            cells.append((labels, values))

    walk(r["values"], [])
    return sorted(cells, key=lambda c: -abs(c[1]))[:k]
