"""Othello on bitboards, many games at once (numpy), as in Li et al. 2023.

Conventions (so anyone can check a model with their own engine):
- a size x size board (6 or 8), squares numbered row-major 0 .. size*size-1; bit s of a uint64 is
  square s;
- the start: of the four centre squares, the two on the main diagonal are white, the other two
  black; black moves first;
- no pass token: a player with no legal move passes silently and the other moves again; the game
  ends when neither can move;
- tokens: 0 is padding, 1 .. size*size-4 are the squares in row-major order skipping the four
  centre squares (Li et al.'s vocabulary); a game is its move sequence, with no start token.

1. A position is two bitboards [games]: the discs of the player to move (`own`) and of the other
   (`opp`).
2. Legal moves: for each of the 8 directions, the opponent discs reachable from an own disc along
   it (`size - 2` shifted ANDs), one step further onto an empty square.
3. A move flips, in each direction, the run of opponent discs from the move that ends at an own disc.
4. Random games: every game picks uniformly among its legal moves; passes are taken; the games
   stop when neither side can move.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))


@lru_cache(maxsize=None)
def _geometry(size: int) -> dict:
    if size not in (4, 6, 8):
        raise ValueError(f"board size is 4, 6 or 8, not {size}")
    full = np.uint64((1 << (size * size)) - 1) if size < 8 else np.uint64(0xFFFFFFFFFFFFFFFF)
    cols = np.arange(size * size) % size
    no_first = np.uint64(sum(1 << s for s in range(size * size) if cols[s] != 0))
    no_last = np.uint64(sum(1 << s for s in range(size * size) if cols[s] != size - 1))
    shifts = []
    for dr, dc in DIRECTIONS:
        step = dr * size + dc
        # a shift by +1 column must not wrap from the last column into the next row's first: mask the
        # squares that would land in column 0 (and the same for -1 column)
        mask = full & (no_first if dc == 1 else no_last if dc == -1 else full)
        shifts.append((step, mask))
    c = size // 2
    centre = [(c - 1) * size + c - 1, (c - 1) * size + c, c * size + c - 1, c * size + c]
    squares = [s for s in range(size * size) if s not in centre]
    token_of = np.zeros(size * size, dtype=np.int64)
    token_of[squares] = np.arange(1, len(squares) + 1)
    return {"full": full, "shifts": shifts, "centre": centre, "squares": np.array(squares),
            "token_of": token_of}


def squares(size: int = 6) -> np.ndarray:
    """The square of each token: squares(size)[token - 1]."""
    return _geometry(size)["squares"]


def token_of(size: int = 6) -> np.ndarray:
    """The token of each square (0 for the four centre squares, never played)."""
    return _geometry(size)["token_of"]


def _shift(x: np.ndarray, step: int, mask: np.uint64, full: np.uint64) -> np.ndarray:
    out = (x << np.uint64(step)) if step > 0 else (x >> np.uint64(-step))
    return out & mask & full


def start(n: int, size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """(black, white) bitboards [n] of the opening position."""
    g = _geometry(size)
    a, b, c, d = g["centre"]  # top-left, top-right, bottom-left, bottom-right
    white = np.full(n, (1 << a) | (1 << d), dtype=np.uint64)
    black = np.full(n, (1 << b) | (1 << c), dtype=np.uint64)
    return black, white


def legal(own: np.ndarray, opp: np.ndarray, size: int = 6) -> np.ndarray:
    """Bitboard [games] of the squares where the player to move may play."""
    g = _geometry(size)
    empty = ~(own | opp) & g["full"]
    moves = np.zeros_like(own)
    for step, mask in g["shifts"]:
        t = _shift(own, step, mask, g["full"]) & opp
        for _ in range(size - 3):
            t |= _shift(t, step, mask, g["full"]) & opp
        moves |= _shift(t, step, mask, g["full"]) & empty
    return moves


def flips(own: np.ndarray, opp: np.ndarray, move: np.ndarray, size: int = 6) -> np.ndarray:
    """Bitboard [games] of the discs that playing `move` (a one-bit bitboard; 0 for none) flips."""
    g = _geometry(size)
    out = np.zeros_like(own)
    for step, mask in g["shifts"]:
        run = np.zeros_like(own)
        x = _shift(move, step, mask, g["full"])
        inside = np.ones(own.shape, dtype=bool)
        for _ in range(size - 1):
            inside &= (x & opp) != 0
            run |= np.where(inside, x, np.uint64(0))
            x = np.where(inside, _shift(x, step, mask, g["full"]), x)  # x: the first square past the run
        closed = (x & own) != 0  # the run ends at an own disc
        out |= np.where(closed, run, np.uint64(0))
    return out


def _bits(x: np.ndarray, size: int) -> np.ndarray:
    """[games] bitboards -> [games, size*size] booleans."""
    return ((x[:, None] >> np.arange(size * size, dtype=np.uint64)) & np.uint64(1)).astype(bool)


@dataclass(frozen=True)
class Games:
    """Move sequences as tokens [game, max_moves] (uint8, 0 = padding after the game's end)."""

    tokens: np.ndarray
    size: int

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> np.ndarray:
        return (self.tokens > 0).sum(1)


def random_games(n: int, *, size: int = 6, seed: int = 0, dedup: bool = True, chunk: int = 200_000) -> Games:
    """n random legal games (uniform over legal moves at each turn), seeded; with `dedup`, no game
    twice (more are drawn until n distinct ones exist)."""
    rng = np.random.default_rng(seed)
    parts, seen = [], 0
    while seen < n:
        want = min(chunk, n - seen) if not dedup else min(chunk, int((n - seen) * 1.05) + 16)
        parts.append(_play_random(want, size, rng))
        tokens = np.concatenate(parts)
        if dedup:
            tokens = np.unique(tokens, axis=0)
            tokens = tokens[rng.permutation(len(tokens))]  # unique sorts; restore a random order
            parts = [tokens]
        seen = len(tokens)
    return Games(np.concatenate(parts)[:n], size)


def _play_random(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    g = _geometry(size)
    black, white = start(n, size)
    own, opp = black, white  # black to move
    max_moves = size * size - 4
    tokens = np.zeros((n, max_moves), dtype=np.uint8)
    count = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    for _ in range(2 * max_moves):
        moves = legal(own, opp, size)
        passing = moves == 0
        if passing.any():  # the other side moves again, if it can
            own, opp = np.where(passing, opp, own), np.where(passing, own, opp)
            moves = np.where(passing, legal(own, opp, size), moves)
        live = moves != 0
        if not live.any():
            break
        scores = rng.random((n, size * size)) * _bits(moves, size)  # [game, square]
        square = scores.argmax(1)
        move = np.where(live, np.uint64(1) << square.astype(np.uint64), np.uint64(0))
        flipped = flips(own, opp, move, size)
        own, opp = own | move | flipped, opp & ~flipped
        tokens[rows[live], count[live]] = g["token_of"][square[live]]
        count += live
        own, opp = np.where(live, opp, own), np.where(live, own, opp)  # the other side's turn
    return tokens


@dataclass(frozen=True)
class Replay:
    """The positions of games, move by move. For a game of T moves, index t is the position after
    move t (so the model at position t sees it and predicts move t+1):
    `board` [game, T, size*size] int8 (+1 black, -1 white, 0 empty), `mover` [game, T] (who made
    move t: +1 black, -1 white, 0 for padding), `to_move` [game, T] (who moves next, after any pass;
    0 when the game is over), `legal` [game, T, size*size] bool (the next move's legal squares)."""

    board: np.ndarray
    mover: np.ndarray
    to_move: np.ndarray
    legal: np.ndarray

    def relative(self) -> np.ndarray:
        """Mine / theirs / empty from the side of the player to move next (after the last move: the
        side that would be next) -- the model plays both sides, so this is the basis in which Nanda
        2023 found the board linear: [game, T, square] with 0 empty, 1 mine, 2 theirs, -1 padding."""
        side = np.where(self.to_move != 0, self.to_move, -self.mover)[..., None]  # [game, T, 1]
        rel = np.where(self.board == 0, 0, np.where(self.board == side, 1, 2))
        return np.where(self.mover[..., None] == 0, -1, rel).astype(np.int8)


def replay(games: Games) -> Replay:
    """Every position of every game (see `Replay`)."""
    size, tokens = games.size, games.tokens.astype(np.int64)
    n, T = tokens.shape
    sq = squares(size)
    black, white = start(n, size)
    turn = np.ones(n, dtype=np.int8)  # +1 black to move
    board = np.zeros((n, T, size * size), dtype=np.int8)
    to_move = np.zeros((n, T), dtype=np.int8)
    mover = np.zeros((n, T), dtype=np.int8)
    nxt = np.zeros((n, T, size * size), dtype=bool)
    for t in range(T):
        live = tokens[:, t] > 0
        own, opp = np.where(turn > 0, black, white), np.where(turn > 0, white, black)
        square = sq[np.maximum(tokens[:, t] - 1, 0)]
        move = np.where(live, np.uint64(1) << square.astype(np.uint64), np.uint64(0))
        if ((legal(own, opp, size) & move) != move).any():
            bad = int(np.nonzero((legal(own, opp, size) & move) != move)[0][0])
            raise ValueError(f"game {bad} plays an illegal move at move {t}")
        flipped = flips(own, opp, move, size)
        own, opp = own | move | flipped, opp & ~flipped
        black, white = np.where(turn > 0, own, opp), np.where(turn > 0, opp, own)
        mover[:, t] = np.where(live, turn, 0)
        turn = np.where(live, -turn, turn)
        # the next player passes when they cannot move and the other can
        own, opp = np.where(turn > 0, black, white), np.where(turn > 0, white, black)
        moves = legal(own, opp, size)
        pass_ = (moves == 0) & (legal(opp, own, size) != 0)
        turn = np.where(pass_, -turn, turn)
        moves = np.where(pass_, legal(opp, own, size), moves)
        board[:, t] = _bits(black, size).astype(np.int8) - _bits(white, size).astype(np.int8)
        to_move[:, t] = np.where(live & (moves != 0), turn, 0)
        nxt[:, t] = _bits(np.where(live, moves, np.uint64(0)), size)
    return Replay(board, mover, to_move, nxt)
