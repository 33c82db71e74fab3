"""The report of `mechscope discover` (discover.json): the circuit as a graph, the faithfulness
curve, and score heatmaps."""

from __future__ import annotations

MAX_DRAWN = 150  # edges drawn in the graph; the rest of a larger circuit is in the table and the JSON

KIND_COLOURS = {"input": "#7f7f7f", "head": "#1f77b4", "mlp": "#2ca02c", "logits": "#1d2330"}


def _node(name: str, n_layers: int) -> dict:
    if name == "input":
        return {"id": name, "layer": -1, "cls": "input"}
    if name == "logits":
        return {"id": name, "layer": n_layers, "cls": "logits"}
    if name.startswith("m"):
        return {"id": name, "layer": int(name[1:]), "cls": "mlp"}
    layer, head = name[1:].split(".h")
    return {"id": name, "layer": int(layer), "head": int(head), "cls": "head"}


def _writer_node(reader: str, group: int) -> str:
    """The node an input belongs to: a5.h2<q -> a5.h2 (key/value head g's input: its group's first
    query head, g * group)."""
    node = reader.split("<")[0]
    if ".kv" not in node:
        return node
    layer, g = node[1:].split(".kv")
    return f"a{layer}.h{int(g) * group}"


def _graph(d: dict) -> dict:
    scores = d["circuit_scores"]
    drawn = sorted(scores, key=lambda e: -abs(scores[e]))[:MAX_DRAWN]
    n_layers = d["n_layers"]
    names = {"logits"}
    edges = []
    for e in drawn:
        w, r = e.split("->")
        target = _writer_node(r, d["n_heads"] // d.get("n_kv_heads", d["n_heads"]))
        names |= {w, target}
        edges.append({"source": w, "target": target, "value": scores[e], "kind": "edge",
                      "label": f"into {r}: score"})
    nodes = sorted((_node(n, n_layers) for n in names), key=lambda n: (n["layer"], n["cls"] != "head", n.get("head", 0)))
    node_scores = d["node_scores"]
    for n in nodes:
        if n["id"] in node_scores:
            n["info"] = f"sum of |score| of its outgoing edges: {node_scores[n['id']]:.4f}"
    shown = f"the {len(drawn)} strongest of its {len(scores)} edges" if len(scores) > len(drawn) else f"its {len(scores)} edges"
    return {"type": "graph", "title": "The circuit", "nodes": nodes, "edges": edges, "colours": KIND_COLOURS,
            "layerLabels": {"-1": "input", str(n_layers): "logits"},
            "note": f"Nodes by layer; {shown}, width by |score| (the estimated change in the metric when the "
                    "edge alone is ablated). An edge into a head's query, key or value input ends at that head "
                    "(a shared key/value head: at the first head of its group). Hover for numbers."}


def _heatmaps(d: dict) -> dict:
    """Node scores as layer x (heads, MLP), and |score| summed from writer layer to reader layer."""
    n_layers, n_heads = d["n_layers"], d["n_heads"]
    ns = d["node_scores"]
    values = [[ns.get(f"a{l}.h{h}", 0.0) for h in range(n_heads)] + [ns.get(f"m{l}", 0.0)] for l in range(n_layers)]
    nodes = {"title": "Node scores: sum of |score| of each node's outgoing edges", "rows": [str(l) for l in range(n_layers)],
             "cols": [str(h) for h in range(n_heads)] + ["MLP"], "values": values, "note": "", "diverging": False,
             "rowTitle": "layer", "colTitle": "head", "heads": False}
    return {"type": "heatmaps", "title": "Where the scores are", "maps": [nodes]}


def discovery_views(d: dict) -> list[dict]:
    fe = d.get("faithfulness_eval")
    items = [["model", d["model"]], ["method", d["method"] + (f" ({d['steps']} steps)" if d.get("steps") else "")],
             ["metric, ablation", f"{d['metric']}, {d['ablation']}"],
             ["prompts", str(d["n_prompts"]) + (f" (+ {d['n_eval_prompts']} fresh)" if d.get("n_eval_prompts") else "")],
             ["graph", f"{d['n_nodes']} nodes, {d['n_edges_total']} edges"],
             ["circuit", f"{d['n_circuit_edges']} edges ({d['edge_fraction']:.2%} of the graph): {d['chosen']}"],
             ["faithfulness (discovery prompts)", f"{d['faithfulness']:.3f}"],
             ["faithfulness (fresh prompts)", "n/a" if fe is None else f"{fe:.3f}"],
             ["metric: clean / circuit / empty", f"{d['clean_metric']:.3f} / {d['circuit_metric']:.3f} / {d['empty_metric']:.3f}"],
             ["time", f"{d['seconds']:.1f} s in all; {d['method']} {d['method_seconds']:.1f} s = "
                      f"{d['forward_equivalents']:.1f} plain forwards"]]
    curve = d["curve"]
    views = [{"type": "summary", "title": "Summary", "items": items}, _graph(d),
             {"type": "lines", "title": "Faithfulness against circuit size", "x": [str(s) for s in curve["sizes"]],
              "xTitle": "edges (top N by |score|, before pruning)", "yTitle": "faithfulness",
              "series": [{"name": f"{d['method']} (area {curve['area']:.3f})", "values": curve["faithfulness"]}],
              "note": "Normalized faithfulness (m(C) - m(empty)) / (m(M) - m(empty)) of the top-N circuits; 1 is "
                      "the whole model, 0 every edge ablated. Area: against log(size), from 1 edge to all."},
             _heatmaps(d),
             {"type": "table", "title": "Top edges", "columns": ["edge", "score"],
              "rows": [[e["edge"], f"{e['score']:+.5f}"] for e in d["top_edges"][:50]],
              "note": "Score: the estimated change in the metric when the edge alone is ablated."}]
    return views


def edge_scores_views(r: dict) -> list[dict]:
    """An EdgeScores result (a notebook's `scores`, or scores.json): summary, where the scores are,
    and the top edges; tens of thousands of edges are never drawn one cell each."""
    graph, extra = r["extra"]["graph"], r["extra"]
    edges, values = r["labels"]["edge"], r["values"]
    order = sorted(range(len(values)), key=lambda i: -abs(values[i] or 0.0))
    nodes: dict[str, float] = {}
    for name, v in zip(edges, values):
        writer = name.split("->")[0]
        nodes[writer] = nodes.get(writer, 0.0) + abs(v or 0.0)
    items = [["model", r["model"]], ["method", r["method"] + (f" ({extra['steps']} steps)" if extra.get("steps") else "")],
             ["metric, ablation", f"{r['metric']}, {r['ablation']}"], ["prompts", str(r["n_prompts"])],
             ["graph", f"{extra['n_nodes']} nodes, {extra['n_edges_total']} edges"], ["time", f"{r['seconds']:.1f} s"]]
    if r.get("circuit_edges") is not None:
        items.append(["ACDC's circuit", f"{len(r['circuit_edges'])} edges (threshold {extra.get('threshold')})"])
    d = {"n_layers": graph["n_layers"], "n_heads": graph["n_heads"], "node_scores": nodes}
    return [{"type": "summary", "title": "Summary", "items": items}, _heatmaps(d),
            {"type": "table", "title": "Top edges", "columns": ["edge", "score"],
             "rows": [[edges[i], f"{values[i]:+.5f}"] for i in order[:50]],
             "note": "Score: the change in the metric when the edge alone is ablated (estimated by EAP)."}]
