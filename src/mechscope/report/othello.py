"""What the Othello-GPT report shows (`mechscope othello probe|intervene`), as views for report.js:
accuracy by layer, accuracy per square, one game with the model's move probabilities and each
layer's probe reading of the board, and interventions before and after."""

from __future__ import annotations


def othello_views(d: dict) -> list[dict]:
    layers = d["layers"]
    best = layers.index(d["best_layer"])
    edits = d.get("intervene") or {}
    size = d.get("size", 6)
    items = [["board", f"{size}x{size}"], ["games probed", f"{d['n_games']} ({d['n_rows']} positions)"],
             ["best layer", str(d["best_layer"])], ["mine/theirs/empty", _pct(d["mine_theirs"][best])],
             ["black/white/empty", _pct(d["black_white"][best])]]
    if "random_init_control" in d:
        items.append(["random-init model", _pct(d["random_init_control"][best])])
    if edits:
        items += [["intervention: legal set right", _pct(edits["intervention_success"])],
                  ["no edit", _pct(edits["none_success"])], ["random direction", _pct(edits["random_success"])]]
    views = [{"type": "summary", "title": "Summary", "items": items}]
    series = [{"name": "mine / theirs / empty", "values": d["mine_theirs"]},
              {"name": "black / white / empty", "values": d["black_white"]}]
    if "random_init_control" in d:
        series.append({"name": "random-init model (mine / theirs)", "values": d["random_init_control"]})
    series.append({"name": "mine / theirs, occupied squares only", "values": d["mine_theirs_nonempty"]})
    views.append({"type": "lines", "title": "The board, read linearly from the residual stream", "x": layers,
                  "xTitle": "residual stream after layer", "yTitle": "held-out accuracy", "series": series,
                  "note": "One 3-class logistic probe per square and site, held out by game. Read relative to the "
                          "player to move (mine / theirs) the board is linear; read as black / white it is much "
                          "less so (Nanda 2023)."})
    rows = [chr(ord("A") + r) for r in range(size)]
    cols = [str(c + 1) for c in range(size)]
    maps = []
    for name, acc in zip(layers, d["mine_theirs_per_square"]):
        err = [[1 - a for a in acc[r * size:(r + 1) * size]] for r in range(size)]
        maps.append({"title": f"layer {name}: mine / theirs / empty", "rows": rows, "cols": cols, "rowTitle": "row",
                     "colTitle": "column", "diverging": False, "heads": False, "values": err,
                     "scale": max(1e-9, max(map(max, err)))})
    views.append({"type": "heatmaps", "title": "Probe error per square", "maps": maps[best:] + maps[:best],
                  "note": "Held-out error (1 - accuracy) of each square's probe; the colour scale runs from 0 to the "
                          "map's largest error. The four centre squares are never empty."})
    if d.get("example_game"):
        views.append({"type": "othello-game", "title": "A held-out game, move by move", **d["example_game"],
                      "best": best,
                      "note": "Left: the board after the move, shaded by the model's probability for each next move "
                              "(cyan rings: the legal moves). Right: the same board as a layer's probes read it "
                              "(red rings: squares they get wrong)."})
    if edits:
        views.append({"type": "table", "title": "Interventions", "columns": ["edit", "legal set exactly right",
                                                                             "wrong moves on average"],
                      "rows": [[name, _pct(edits[f"{key}_success"]), edits[f"{key}_mean_errors"]]
                               for name, key in (("probe direction", "intervention"), ("none", "none"),
                                                 ("random direction of the same size", "random"))],
                      "note": f"{edits['n_cases']} positions of held-out games. At each, one disc is flipped "
                              f"(mine <-> theirs) by moving the residual stream along that square's probe direction "
                              f"at every layer from {edits['start_layer']} on; right means the model's top-k moves "
                              "(k = legal moves of the edited board) are exactly the edited board's legal moves."})
        if edits.get("examples"):
            views.append({"type": "othello-edits", "title": "Interventions, before and after", "size": size,
                          "examples": edits["examples"],
                          "note": "Left: the real board, the model's predicted moves with no edit (red dots; shading: "
                                  "its probabilities) and the legal moves (cyan rings). Right: the board with the "
                                  "magenta-ringed disc flipped, the model's predicted moves after the edit, and that "
                                  "board's legal moves."})
    return views


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"
