"""What the positional study's report shows (`mechscope positions`), as views for report.js."""

from __future__ import annotations


def positions_views(d: dict) -> list[dict]:
    layers = d["layers"]
    best = layers.index(d["best_layer"])
    c = d.get("causal")
    counts = ", ".join(f"{k} token{'s' if str(k) != '1' else ''}: {v}" for k, v in d["word_tokens"].items())
    views = [{"type": "summary", "title": "Summary", "items": [
        ["model", d["model"]], ["prompts", f"{d['n_prompts']} ({d['n_rows']} word tokens)"],
        ["best layer", str(d["best_layer"])], ["word-index accuracy", _pct(d["accuracy"][best])],
        ["absolute-position baseline", _pct(d["position_baseline"][best])],
        ["random-init model", _pct(d["random_init_control"][best])],
        ["shuffled labels", _pct(d["shuffled_labels"][best])],
        ["cross / same template", "n/a" if d.get("cross_template_ratio") is None else f"{d['cross_template_ratio']:.2f}"],
        ["time", f"{d['seconds']:.0f} s"]]}]
    views.append({"type": "lines", "title": "Word index, read from the residual stream", "x": layers,
                  "xTitle": "residual stream after layer", "yTitle": "held-out accuracy", "series": [
                      {"name": "word-index probe", "values": d["accuracy"]},
                      {"name": "absolute position only", "values": d["position_baseline"]},
                      {"name": "random-init model", "values": d["random_init_control"]},
                      {"name": "shuffled labels", "values": d["shuffled_labels"]}],
                  "note": f"A logistic probe per layer, held out by prompt. Words sampled: {counts}. Above the "
                          "position line, the stream says which word a token belongs to beyond where it stands."})
    n = len(d["per_index_f1"])
    views.append({"type": "heatmaps", "title": f"At layer {d['best_layer']}", "maps": [
        {"title": "Confusion (true word index x predicted)", "rows": [str(i) for i in range(n)],
         "cols": [str(i) for i in range(n)], "values": _row_fractions(d["confusion"]), "rowTitle": "true",
         "colTitle": "predicted", "diverging": False, "heads": False,
         "note": "Each row: how the held-out tokens of one word index were classified (fractions of the row)."}]})
    views.append({"type": "table", "title": "Per-index F1 at the best layer", "columns": ["word index", "F1"],
                  "rows": [[str(i), f] for i, f in enumerate(d["per_index_f1"])]})
    if c:
        views.append({"type": "table", "title": "Cross-template patching of the S-inhibition heads",
                      "columns": ["source of the heads' END output", "mean change in logit difference", "example"],
                      "rows": [["same template, subject first", c["same_template_effect"], c["example"]["same_template"]],
                               ["other template (names elsewhere), subject first", c["cross_template_effect"],
                                c["example"]["cross_template"]],
                               ["same template, subject second (names differ only)", c["same_order_effect"],
                                c["example"]["same_order"]]],
                      "note": f"Heads {' '.join(c['heads'])} ({d['heads_source']}); target prompts like "
                              f"\u201c{c['example']['target']}\u201d (logit difference {c['clean_logit_diff']:.2f}). "
                              "If the heads move \u201cthe subject is the first/second name\u201d, the first two "
                              "rows are alike."})
    else:
        views.append({"type": "table", "title": "Cross-template patching", "columns": ["note"],
                      "rows": [[d["heads_source"]]]})
    return views


def _row_fractions(counts: list[list[int]]) -> list[list[float]]:
    return [[c / max(1, sum(row)) for c in row] for row in counts]


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"
