"""The shipped 6x6 Othello-GPT: it plays legal moves, its board is linear in the mine/theirs basis
(far better than black/white, and than an untrained network), and editing that board through the
probes' directions changes its moves as the edited board's rules say. (Marked real: a trained model
and a minute of work; it needs no download, the model ships with the package.)"""

import pytest

from mechscope.organisms.othello import random_games
from mechscope.organisms.othello.probe import intervene, load, probe_layers
from mechscope.organisms.othello.train import evaluate

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("no_grad")]


def test_the_shipped_model_reads_and_writes_its_board():
    model = load(6)
    assert evaluate(model.hf, random_games(500, seed=777))["top1_legal"] >= 0.99
    games = random_games(300, seed=1001)  # a tenth of the CLI's default: accuracies within about 0.003
    out, probes, acts = probe_layers(model, games)
    best = out["layers"].index(out["best_layer"])
    # measured here: mine/theirs 0.953 at layer 5 (0.955 with 1000 games, 0.952 with the CLI's 3000),
    # black/white 0.747, random init 0.705: the 95%
    assert out["mine_theirs"][best] >= 0.95
    assert out["mine_theirs"][best] >= out["black_white"][best] + 0.15
    assert out["mine_theirs"][best] >= out["random_init_control"][best] + 0.15
    edits = intervene(model, random_games(300, seed=1002), probes, games, acts, start=4, n=100)
    # measured here on these 100 positions: 77% of edits give exactly the edited board's legal moves; 14%
    # without an edit, 13% with a random direction (76.5%, 23.5% and 21.0% on the CLI's 200)
    assert edits["intervention_success"] >= max(edits["none_success"], edits["random_success"]) + 0.4
