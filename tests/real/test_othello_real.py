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
    games = random_games(300, seed=1001)  # a tenth of the CLI's default: accuracies within about 0.015
    out, probes, acts = probe_layers(model, games)
    best = out["layers"].index(out["best_layer"])
    # measured with 3000 games: mine/theirs 0.938 at layer 5, black/white 0.763, random init 0.700
    assert out["mine_theirs"][best] >= 0.9
    assert out["mine_theirs"][best] >= out["black_white"][best] + 0.1
    assert out["mine_theirs"][best] >= out["random_init_control"][best] + 0.1
    edits = intervene(model, random_games(300, seed=1002), probes, games, acts, start=4, n=100)
    # measured on 200 positions: 67% of edits give exactly the edited board's legal moves; 23% without
    # an edit, 20% with a random direction
    assert edits["intervention_success"] >= max(edits["none_success"], edits["random_success"]) + 0.2
