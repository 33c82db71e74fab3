"""What the Othello report draws: one game move by move, as the model and its probes see it.

1. The true board after each move (+1 black, -1 white, 0 empty), who moves next, and the next
   move's legal squares.
2. The model's next-move probabilities on the squares (softmax over the squares; padding left out).
3. Each site's mine/theirs probe reading of the same board, turned back into black/white for
   drawing (mine = the side to move), so a wrong square shows at a glance.
"""

from __future__ import annotations

import numpy as np
import torch

from mechscope.organisms.othello.engine import Games, replay, squares


def side_to_move(rep, g: int) -> np.ndarray:
    """[T] the side the mine/theirs labels are relative to (as `Replay.relative`)."""
    return np.where(rep.to_move[g] != 0, rep.to_move[g], -rep.mover[g])


def square_probs(logits: torch.Tensor, size: int) -> np.ndarray:
    """Logits [..., vocab] -> next-move probabilities per board square [..., size*size] (0 on the
    centre squares, which are never moves)."""
    p = logits[..., 1:].float().softmax(-1).cpu().numpy()  # [..., squares - 4]
    out = np.zeros((*p.shape[:-1], size * size))
    out[..., squares(size)] = p
    return out


@torch.no_grad()
def game_record(model, games: Games, index: int, probes: dict, layers: list[str]) -> dict:
    """Game `index` of `games` move by move (module docstring); `probes` maps site -> BoardProbe
    (mine/theirs) and `layers` names the sites in order."""
    size = games.size
    one = Games(games.tokens[index:index + 1], size)
    T = int((one.tokens[0] > 0).sum())
    rep = replay(one)
    tokens = torch.from_numpy(one.tokens[:, :T].astype(np.int64)).to(model.device)  # [1, T]
    sites = list(probes)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in probes)
    side = side_to_move(rep, 0)[:T, None]  # [T, 1]
    readings = []
    for site in sites:
        cls = probes[site].predict(cache[site][0].float().cpu()).numpy()  # [T, square]: 0 empty, 1 mine, 2 theirs
        readings.append(np.select([cls == 1, cls == 2], [side, -side], 0).astype(int).tolist())
    sq = squares(size)
    return {"size": size, "game": int(index), "moves": [int(sq[t - 1]) for t in one.tokens[0, :T]],
            "board": rep.board[0, :T].astype(int).tolist(), "mover": rep.mover[0, :T].astype(int).tolist(),
            "to_move": rep.to_move[0, :T].astype(int).tolist(),
            "legal": [np.nonzero(row)[0].tolist() for row in rep.legal[0, :T]],
            "probs": np.round(square_probs(logits[0], size), 4).tolist(),  # [T, square]
            "layers": layers, "reading": readings}  # [site, T, square]
