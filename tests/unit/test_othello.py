"""The Othello engine against hand-checked positions and against a plain one-game-at-a-time reference
written here (lists of lists, no bit tricks) on thousands of random games (2000 on 6x6, 500 on 8x8)."""

import numpy as np
import pytest
import torch

from conftest import tiny_othello
from mechscope.organisms.othello import Games, legal, random_games, replay, squares, start, token_of
from mechscope.organisms.othello.engine import flips

DIRS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


# ---- the reference -----------------------------------------------------------------------------
def ref_start(n):
    b = [[0] * n for _ in range(n)]
    c = n // 2
    b[c - 1][c - 1] = b[c][c] = -1  # white on the main diagonal
    b[c - 1][c] = b[c][c - 1] = 1  # black
    return b


def ref_flips(b, player, r, c):
    n, out = len(b), []
    if b[r][c] != 0:
        return out
    for dr, dc in DIRS:
        run, rr, cc = [], r + dr, c + dc
        while 0 <= rr < n and 0 <= cc < n and b[rr][cc] == -player:
            run.append((rr, cc))
            rr, cc = rr + dr, cc + dc
        if run and 0 <= rr < n and 0 <= cc < n and b[rr][cc] == player:
            out += run
    return out


def ref_legal(b, player):
    n = len(b)
    return sorted(r * n + c for r in range(n) for c in range(n) if ref_flips(b, player, r, c))


def ref_replay(moves, n):
    """(boards after each move, legal squares for the next move) of one game given as squares."""
    b, player, boards, legals = ref_start(n), 1, [], []
    for sq in moves:
        if not ref_legal(b, player):
            player = -player  # a forced pass
        r, c = divmod(sq, n)
        flipped = ref_flips(b, player, r, c)
        assert flipped, "illegal move in the reference"
        for rr, cc in flipped + [(r, c)]:
            b[rr][cc] = player
        player = -player
        nxt = ref_legal(b, player) or ref_legal(b, -player)
        boards.append([x for row in b for x in row])
        legals.append(nxt)
    return boards, legals


# ---- hand-checked positions ----------------------------------------------------------------------
def test_the_opening_moves_are_the_four_known_ones():
    black, white = start(1, 8)
    assert sorted(np.nonzero(np.unpackbits(legal(black, white, 8).view(np.uint8), bitorder="little"))[0]) == \
        [19, 26, 37, 44]  # d3, c4, f5, e6
    black, white = start(1, 6)
    moves = int(legal(black, white, 6)[0])
    assert sorted(s for s in range(36) if moves >> s & 1) == [8, 13, 22, 27]


def test_a_move_flips_in_all_eight_directions():
    n = 8
    board = [[0] * n for _ in range(n)]
    for dr, dc in DIRS:  # the move at (3, 3): an opponent disc next to it, an own disc beyond, each way
        board[3 + dr][3 + dc] = -1
        board[3 + 2 * dr][3 + 2 * dc] = 1
    own = np.array([sum(1 << (r * n + c) for r in range(n) for c in range(n) if board[r][c] == 1)], dtype=np.uint64)
    opp = np.array([sum(1 << (r * n + c) for r in range(n) for c in range(n) if board[r][c] == -1)], dtype=np.uint64)
    assert int(legal(own, opp, n)[0]) >> 27 & 1
    got = int(flips(own, opp, np.array([1 << 27], dtype=np.uint64), n)[0])
    assert got == int(opp[0])  # all eight neighbours flip
    edge = np.array([1 << 7], dtype=np.uint64)  # a run must not wrap from one row's end into the next
    assert int(flips(np.array([1 << 14], dtype=np.uint64), np.array([1 << 8], dtype=np.uint64), edge, n)[0]) == 0


def test_tokens_skip_the_centre_squares():
    assert len(squares(6)) == 32 and len(squares(8)) == 60
    assert squares(6)[0] == 0 and 14 not in squares(6) and 21 not in squares(6)
    assert token_of(6)[squares(6)].tolist() == list(range(1, 33))


# ---- against the reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [6, 8])
def test_random_games_match_the_reference(size):
    games = random_games(2000 if size == 6 else 500, size=size, seed=size)
    rep = replay(games)
    sq = squares(size)
    passes = 0
    for g in range(len(games)):
        moves = [int(sq[t - 1]) for t in games.tokens[g] if t]
        boards, legals = ref_replay(moves, size)
        T = len(moves)
        assert rep.board[g, :T].tolist() == boards
        assert [sorted(np.nonzero(rep.legal[g, t])[0].tolist()) for t in range(T)] == legals
        assert legals[-1] == []  # a game ends only when neither side can move
        passes += sum(int(rep.mover[g, t] == rep.mover[g, t + 1]) for t in range(T - 1))
    assert passes > 0  # forced passes happened and were followed


def test_games_are_seeded_distinct_and_compact():
    a, b = random_games(3000, seed=1), random_games(3000, seed=1)
    assert np.array_equal(a.tokens, b.tokens) and a.tokens.dtype == np.uint8
    assert len(np.unique(a.tokens, axis=0)) == 3000
    assert not np.array_equal(a.tokens, random_games(3000, seed=2).tokens)
    assert a.lengths.max() <= 32 and a.lengths.min() >= 9


def test_labels_are_relative_to_the_player_to_move():
    games = random_games(200, seed=3)
    rep = replay(games)
    rel = rep.relative()  # 0 empty, 1 mine, 2 theirs
    live = rep.mover != 0
    side = np.where(rep.to_move != 0, rep.to_move, -rep.mover)
    black_to_move = live & (side == 1)
    white_to_move = live & (side == -1)
    assert (rel[black_to_move] == np.select([rep.board[black_to_move] == 1, rep.board[black_to_move] == -1],
                                            [1, 2], 0)).all()
    assert (rel[white_to_move] == np.select([rep.board[white_to_move] == -1, rep.board[white_to_move] == 1],
                                            [1, 2], 0)).all()
    assert (rel[~live] == -1).all()


def test_an_illegal_game_is_refused():
    bad = Games(np.array([[1, 1] + [0] * 30], dtype=np.uint8), 6)
    with pytest.raises(ValueError, match="illegal"):
        replay(bad)


# ---- training, probes and interventions on a tiny model --------------------------------------------------
def test_a_few_steps_of_training_lower_the_loss_and_resume(tmp_path):
    import json

    from mechscope.organisms.othello.train import evaluate, model_config, train

    games = random_games(400, seed=5)
    config = model_config(6, d_model=32, n_layers=2, n_heads=4)
    model = train(games, tmp_path, config=config, steps=200, batch_size=32, lr=3e-3, warmup=20, save_every=100)
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.15  # the mean of steps 1-100 against that of 101-200
    # a uniform guess is legal about 14% of the time (4.5 legal moves of 32 on average)
    assert evaluate(model, random_games(50, seed=6))["top1_legal"] > 0.3
    again = train(games, tmp_path, config=config, steps=200, batch_size=32, save_every=100)  # nothing left to do
    for a, b in zip(model.parameters(), again.parameters()):
        assert a.equal(b)


def test_bf16_autocast_and_a_compiled_model_give_the_training_loss(tmp_path):
    """The GPU recipe's two switches: a compiled model's loss is the eager one (same weights, float32,
    up to fused-kernel rounding), bf16 autocast's is within bf16's rounding of it, and training under
    both still saves float32 weights that plain `transformers` loads."""
    from torch._dynamo.utils import counters
    from transformers import GPT2LMHeadModel

    from mechscope.organisms.othello.train import _step_loss, model_config, train

    games = random_games(64, seed=8)
    batch = torch.from_numpy(games.tokens[:16].astype(np.int64))  # [batch, moves]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(model_config(6, d_model=32, n_layers=1, n_heads=4))
    eager = _step_loss(model, "cpu", "fp32", False)(batch)
    counters.clear()
    compiled = _step_loss(model, "cpu", "fp32", True)(batch)
    assert counters["stats"]["unique_graphs"] > 0  # torch.compile traced it
    bf16 = _step_loss(model, "cpu", "bf16", False)(batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert compiled.grad_fn is not None  # it trains: the gradient flows through the compiled graph
    assert abs(bf16.item() - eager.item()) < 0.02 * eager.item()  # bf16 keeps 8 bits of mantissa
    assert bf16.item() != eager.item()  # autocast was on
    with pytest.raises(ValueError, match="precision"):
        train(games, tmp_path / "bad", steps=1, precision="fp16")
    assert not (tmp_path / "bad").exists()  # refused before any work
    train(games, tmp_path / "m", config=model_config(6, d_model=32, n_layers=1, n_heads=4), steps=3, batch_size=8,
          precision="bf16", save_every=3)
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "m").transformer.wte.weight.dtype == torch.float32


def test_an_8x8_model_trains_probes_and_intervenes(tmp_path):
    """The 8x8 board through the whole chain (no 8x8 model ships; `--size 8 --model DIR` takes a trained one):
    60 tokens, 64 squares' probes, edits whose legal sets come from the 8x8 engine."""
    from mechscope.models.hooked import HookedModel
    from mechscope.organisms.othello.probe import intervene, probe_layers
    from mechscope.organisms.othello.train import evaluate, model_config, train

    games = random_games(80, size=8, seed=9)
    assert games.tokens.shape[1] == 60 and games.tokens.max() <= 60
    hf = train(games, tmp_path, config=model_config(8, d_model=32, n_layers=2, n_heads=4), steps=20, batch_size=16,
               lr=3e-3, warmup=5, save_every=20)
    assert hf.config.vocab_size == 61 and 0 <= evaluate(hf, games)["top1_legal"] <= 1
    model = HookedModel(hf, tokenizer=None)
    out, probes, acts = probe_layers(model, games)
    assert out["size"] == 8 and len(out["mine_theirs_per_square"][0]) == 64
    edits = intervene(model, random_games(20, size=8, seed=10), probes, games, acts, start=1, n=5, keep=1)
    assert edits["n_cases"] == 5 and edits["size"] == 8 and len(edits["examples"][0]["board"]) == 64


def test_probes_and_interventions_run_on_a_tiny_model():
    from mechscope.organisms.othello.probe import intervene, probe_layers

    model, games = tiny_othello(), random_games(60, seed=7)
    out, probes, acts = probe_layers(model, games)
    assert out["layers"] == ["embed", "0", "1"] and len(out["mine_theirs_per_square"][0]) == 36
    for key in ("mine_theirs", "black_white", "random_init_control"):
        assert len(out[key]) == 3 and all(0 <= x <= 1 for x in out[key])
    edits = intervene(model, random_games(30, seed=8), probes, games, acts, start=1, n=10, keep=3)
    assert edits["n_cases"] == 10 and 0 <= edits["intervention_success"] <= 1
    assert len(edits["examples"]) == 3
    for e in edits["examples"]:  # the report's boards, against the plain reference engine
        changed = [i for i, (a, b) in enumerate(zip(e["board"], e["edited"])) if a != b]
        assert changed == [e["square"]] and e["edited"][e["square"]] == -e["board"][e["square"]] != 0
        n = 6
        grid = [e["edited"][r * n:(r + 1) * n] for r in range(n)]
        assert e["legal_after"] == ref_legal(grid, e["to_move"]) != e["legal_before"]
        for kind in ("intervention", "none", "random"):
            assert len(e[kind]["top"]) == len(e["legal_after"]) and abs(sum(e[kind]["probs"]) - 1) < 1e-3


def test_the_report_game_record_is_the_game_as_model_and_probes_see_it():
    import torch

    from mechscope.organisms.othello.examples import game_record
    from mechscope.organisms.othello.probe import probe_layers

    model, games = tiny_othello(), random_games(40, seed=7)
    out, probes, acts = probe_layers(model, games, controls=False)
    acts.close()
    game = random_games(1, seed=9)
    rec = game_record(model, game, 0, probes, out["layers"])
    T = int((game.tokens[0] > 0).sum())
    boards, legals = ref_replay([int(squares(6)[t - 1]) for t in game.tokens[0, :T]], 6)
    assert rec["board"] == boards and rec["legal"] == legals and len(rec["moves"]) == T
    assert all(abs(sum(p) - 1) < 1e-3 and all(p[c] == 0 for c in (14, 15, 20, 21)) for p in rec["probs"])
    logits = model(torch.from_numpy(game.tokens[:, :T].astype("int64")))[0]  # [T, vocab]
    top = logits[:, 1:].argmax(-1).numpy()
    assert [max(range(36), key=p.__getitem__) for p in rec["probs"]] == squares(6)[top].tolist()
    site = "blocks.1.hook_resid_post"
    _, cache = model.run_with_cache(torch.from_numpy(game.tokens[:, :T].astype("int64")))
    cls = probes[site].predict(cache[site][0]).numpy()  # [T, square] mine / theirs
    side = [to if to else -m for to, m in zip(rec["to_move"], rec["mover"])]
    want = [[0 if c == 0 else (s if c == 1 else -s) for c in row] for row, s in zip(cls.tolist(), side)]
    assert rec["reading"][out["layers"].index("1")] == want


def test_the_shipped_model_is_what_its_metadata_says():
    import hashlib
    import json

    from transformers import GPT2LMHeadModel

    from mechscope.organisms.othello.probe import checkpoint
    from mechscope.organisms.othello.train import evaluate

    folder = checkpoint(6)
    meta = json.loads((folder / "meta.json").read_text())
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert (folder / "model.safetensors").stat().st_size < 10 * 2**20
    model = GPT2LMHeadModel.from_pretrained(folder).eval()  # plain transformers loads it
    games = random_games(300, seed=12345)  # fresh games; 300 of them pin the rate to about 1%
    assert abs(evaluate(model, games)["top1_legal"] - meta["top1_legal"]) < 0.01
