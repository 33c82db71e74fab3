"""Reading the board out of Othello-GPT, and writing it back in.

1. Rows: every position of every game that has been played (the board after move t), at the
   embeddings and after every layer (`collect`).
2. A board probe per site: one linear probe per square (empty / mine / theirs, or empty / black /
   white), trained jointly (their losses are independent, so one L-BFGS run fits all 36 at once;
   20 iterations: held-out accuracy moves by under 0.1% from 20 to 100 on the shipped model), on
   standardized features, held out by game.
3. The control: the same probes on a randomly re-initialised model of the same shape.
4. Interventions (Li et al. 2023, Nanda 2023): at move t of a game, pick a disc whose flip (mine <->
   theirs) changes the legal moves; from layer `start` on, set the residual stream's coordinate
   along that square's mine-theirs direction (each layer's own probe) to the mean coordinate of the
   flipped state; then compare the model's top-k moves (k = legal moves of the edited board) with
   the edited board's legal set. Controls: no intervention, and a random direction moved by the same
   distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mechscope.organisms.othello.engine import Games, legal, replay, squares
from mechscope.organisms.othello.examples import square_probs
from mechscope.probes.collect import collect
from mechscope.probes.fit import split_by_group

BASES = ("mine_theirs", "black_white")


def checkpoint(size: int = 6) -> Path:
    """The folder of the shipped model (config.json, model.safetensors, meta.json), loadable by plain
    `transformers` (`GPT2LMHeadModel.from_pretrained(checkpoint())`)."""
    folder = Path(str(files("mechscope.organisms.othello") / "checkpoints" / f"size{size}"))
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no shipped Othello-GPT for a {size}x{size} board; train one with "
                                "mechscope.organisms.othello.train")
    return folder


def load(size: int = 6, device: str = "cpu"):
    """The shipped Othello-GPT as a HookedModel (token ids are moves; there is no tokenizer)."""
    from transformers import GPT2LMHeadModel

    from mechscope.models.hooked import HookedModel

    return HookedModel(GPT2LMHeadModel.from_pretrained(checkpoint(size)).to(device), tokenizer=None)


def labels(games: Games, basis: str) -> np.ndarray:
    """[game, T, square] labels: 0 empty, 1 mine / black, 2 theirs / white; -1 after the game."""
    rep = replay(games)
    if basis == "mine_theirs":
        return rep.relative()
    if basis == "black_white":
        out = np.select([rep.board == 1, rep.board == -1], [1, 2], 0).astype(np.int8)
        return np.where(rep.mover[..., None] == 0, -1, out).astype(np.int8)
    raise ValueError(f"basis is one of {BASES}, not {basis!r}")


@dataclass(frozen=True)
class BoardProbe:
    """Per-square linear probes on raw activations: weight [square, class, d], bias [square, class]."""

    weight: Tensor
    bias: Tensor
    test_accuracy: float  # over every (row, square) of the held-out games
    square_accuracy: list[float]
    test_accuracy_nonempty: float  # over the squares that hold a disc (empty squares are easy)

    def predict(self, acts: Tensor) -> Tensor:
        return (torch.einsum("rd,scd->rsc", acts.to(self.weight), self.weight) + self.bias).argmax(-1)


def fit_board_probe(acts: Tensor, target: Tensor, groups: Tensor, *, test_fraction: float = 0.2, seed: int = 0,
                    l2: float = 1e-3, steps: int = 20) -> BoardProbe:
    """Jointly fit one 3-class logistic probe per square (see the module docstring): acts [row, d],
    target [row, square]."""
    x, y = acts.float(), target.long()
    train, test = split_by_group(groups, test_fraction, seed)
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    z = (x - mean) / std  # [row, d]
    n_sq, d = y.shape[1], x.shape[1]
    w = torch.zeros(n_sq, 3, d, requires_grad=True)
    b = torch.zeros(n_sq, 3, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")
    zt, yt = z[train], y[train]

    def loss():
        opt.zero_grad()
        logits = torch.einsum("rd,scd->rsc", zt, w) + b  # [row, square, class]
        value = nn.functional.cross_entropy(logits.flatten(0, 1), yt.flatten()) * n_sq + l2 * w.square().sum() / 2
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    weight = (w / std).detach()  # back to raw activations
    bias = (b - torch.einsum("d,scd->sc", mean, weight)).detach()
    probe = BoardProbe(weight, bias, 0.0, [], 0.0)
    hit = probe.predict(x[test]) == y[test]  # [row, square]
    full = y[test] != 0
    return BoardProbe(weight, bias, hit.double().mean().item(), hit.double().mean(0).tolist(),
                      hit[full].double().mean().item())


def probe_layers(model, games: Games, *, controls: bool = True, seed: int = 0, batch_size: int = 256,
                 log=lambda text: None) -> dict:
    """Board-probe accuracy at the embeddings and after every layer, in both bases, beside the
    random-init control (mine/theirs); `probe.json` of `mechscope othello probe`."""
    from mechscope.probes.sweep import residual_sites

    sites = residual_sites(model)
    tokens = torch.from_numpy(games.tokens.astype(np.int64))
    mask = tokens > 0
    targets = {basis: torch.from_numpy(labels(games, basis))[mask] for basis in BASES}  # [row, square]
    acts = collect(model, tokens, sites, positions=mask, batch_size=batch_size)
    reinit = collect(model.reinitialized(seed), tokens, sites, positions=mask, batch_size=batch_size) if controls else None
    out: dict = {"layers": ["embed"] + [str(l) for l in range(model.cfg.n_layers)], "size": games.size, "n_games": len(games),
                 "n_rows": len(acts)}
    probes = {}
    for basis in BASES:
        out[basis], out[f"{basis}_nonempty"], out[f"{basis}_per_square"] = [], [], []
        for site in sites:
            p = fit_board_probe(acts[site], targets[basis], acts.prompt, seed=seed)
            out[basis].append(p.test_accuracy)
            out[f"{basis}_nonempty"].append(p.test_accuracy_nonempty)
            out[f"{basis}_per_square"].append(p.square_accuracy)
            if basis == "mine_theirs":
                probes[site] = p
            log(f"{basis} {site}: {p.test_accuracy:.3f} ({p.test_accuracy_nonempty:.3f} on discs)")
    if reinit is not None:
        control = [fit_board_probe(reinit[s], targets["mine_theirs"], reinit.prompt, seed=seed) for s in sites]
        out["random_init_control"] = [p.test_accuracy for p in control]
        out["random_init_control_nonempty"] = [p.test_accuracy_nonempty for p in control]
        reinit.close()
    best = int(np.argmax(out["mine_theirs"]))
    out["best_layer"] = out["layers"][best]
    return out, probes, acts


def intervene(model, games: Games, probes: dict, probe_games: Games, acts, *, start: int, n: int = 200,
              seed: int = 0, keep: int = 4) -> dict:
    """The intervention experiment of the module docstring on `n` positions of `games` (games the
    probes were not trained on); `probes` and `acts` are what `probe_layers` returned for
    `probe_games`. `intervene.json` of `mechscope othello intervene`, with the first `keep` cases in
    full (boards before and after, each run's top-k moves and move probabilities) for the report."""
    size = games.size
    sq = squares(size)
    rep = replay(games)
    rel = rep.relative()
    rng = np.random.default_rng(seed)
    layers = list(range(start, model.cfg.n_layers))
    sites = [f"blocks.{l}.hook_resid_post" for l in layers]
    # per layer: the unit direction theirs -> mine of each square, and the mean coordinate of each class
    mt = torch.from_numpy(labels(probe_games, "mine_theirs")[probe_games.tokens > 0])  # [row, square]
    unit, level = {}, {}
    for site in sites:
        w = probes[site].weight  # [square, class, d]
        u = w[:, 1] - w[:, 2]  # mine minus theirs: [square, d]
        unit[site] = u / u.norm(dim=-1, keepdim=True)
        coord = acts[site].float() @ unit[site].T  # [row, square]
        level[site] = {c: torch.stack([coord[:, s][mt[:, s] == c].mean() for s in range(size * size)])
                       for c in (1, 2)}  # class -> [square]
    cases = []
    tries = 0
    while len(cases) < n and tries < 50 * n:
        tries += 1
        g = int(rng.integers(len(games)))
        T = int((games.tokens[g] > 0).sum())
        t = int(rng.integers(4, T - 1)) if T > 6 else T - 2
        side = rep.to_move[g, t]
        if side == 0:
            continue
        s = int(rng.integers(size * size))
        if rel[g, t, s] == 0:
            continue
        board = rep.board[g, t].copy()
        board[s] = -board[s]  # the flip
        own = np.array([sum(1 << i for i in range(size * size) if board[i] == side)], dtype=np.uint64)
        opp = np.array([sum(1 << i for i in range(size * size) if board[i] == -side)], dtype=np.uint64)
        new = int(legal(own, opp, size)[0])
        old = np.nonzero(rep.legal[g, t])[0].tolist()
        new_set = [i for i in range(size * size) if new >> i & 1]
        if not new_set or new_set == old:
            continue  # the flip must change the legal moves, and leave some
        cases.append((g, t, s, int(rel[g, t, s]), new_set, old))
    results = {"intervention": [], "none": [], "random": []}
    examples = []  # the first `keep` cases, drawn before and after in the report
    gen = torch.Generator().manual_seed(seed)
    for g, t, s, state, new_set, old in cases:
        target = 2 if state == 1 else 1
        shown = {}
        tokens = torch.from_numpy(games.tokens[g: g + 1, : t + 1].astype(np.int64)).to(model.device)
        for kind in results:
            hooks = []
            for site in sites:
                u = unit[site][s]
                want = level[site][target][s]

                def edit(x, hook, u=u, want=want, kind=kind):
                    x = x.clone()
                    v = x[0, t]  # [d], on the model's device
                    w = u.to(v.device)  # the probes live on the CPU
                    delta = (want.to(v.device) - v.float() @ w) * w  # [d]
                    if kind == "random":
                        r = torch.randn(u.shape, generator=gen).to(v.device)  # drawn on the CPU: the same on any device
                        delta = r / r.norm() * delta.norm()
                    x[0, t] = v + delta.to(v)
                    return x

                if kind != "none":
                    hooks.append((site, edit))
            with torch.no_grad():
                full = model.run_with_hooks(tokens, fwd_hooks=hooks)[0, t].float().cpu()  # [vocab]
            logits = full[1:]  # [token - 1]: the squares
            top = set(sq[logits.argsort(descending=True)[: len(new_set)].numpy()].tolist())
            results[kind].append(len(top ^ set(new_set)) // 2)  # moves predicted that are not legal
            shown[kind] = {"top": sorted(top), "probs": np.round(square_probs(full, size), 4).tolist()}
        if len(examples) < keep:
            board = rep.board[g, t]
            examples.append({"game": g, "move": t, "square": s, "to_move": int(rep.to_move[g, t]),
                             "board": board.astype(int).tolist(),
                             "edited": np.where(np.arange(size * size) == s, -board, board).astype(int).tolist(),
                             "legal_before": old, "legal_after": new_set, **shown})
    return {"start_layer": start, "n_cases": len(cases),
            **{f"{k}_success": float(np.mean([e == 0 for e in v])) if v else None for k, v in results.items()},
            **{f"{k}_mean_errors": float(np.mean(v)) if v else None for k, v in results.items()},
            "size": size, "examples": examples}
