"""`mechscope othello ...`: games, training, evaluation, probes and interventions, each writing JSON."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

othello_app = typer.Typer(help="Othello-GPT, a model organism: games, training, evaluation, probes, interventions.",
                          no_args_is_help=True)

Size = Annotated[int, typer.Option(help="Board size: 6 or 8.")]
OutDir = Annotated[Path, typer.Option(help="Folder for the outputs (created).")]
ModelDir = Annotated[Optional[Path], typer.Option("--model", help="A trained model's folder (default: the shipped one).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace outputs of an earlier run.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]


def _outputs(out: Path, names: list[str], overwrite: bool, *, n: int, size: int) -> list[Path]:
    """Check the request (before any work) and the outputs."""
    from mechscope.cli import MAX_GAMES, folder_outputs
    from mechscope.errors import InputError

    if size not in (6, 8):
        raise InputError(f"--size is 6 or 8, not {size}")
    if not 1 <= n <= MAX_GAMES:
        raise InputError(f"--n must be between 1 and {MAX_GAMES:,} games, not {n}")
    return folder_outputs(out, names, overwrite)


def _check_model(folder: Path | None, size: int) -> None:
    """A --model folder holds a model; without one, a shipped model exists for this board size."""
    from mechscope.errors import InputError
    from mechscope.organisms.othello.probe import checkpoint

    if folder is None:
        try:
            checkpoint(size)
        except FileNotFoundError:
            raise InputError(f"no Othello-GPT ships for a {size}x{size} board; train one with `mechscope othello "
                             f"train --size {size}` and pass its folder as --model") from None
    elif not (folder / "config.json").is_file():
        raise InputError(f"--model {folder} is not a trained model's folder (no config.json); give the --out folder "
                         "of `mechscope othello train`")


def _write(out: Path, files: dict) -> None:
    from mechscope.cli import write_folder

    write_folder(out, files)


def _model(folder: Path | None, size: int, device: str = "cpu"):
    from transformers import GPT2LMHeadModel

    from mechscope.models.hooked import HookedModel
    from mechscope.models.load import _check_device
    from mechscope.organisms.othello.probe import checkpoint

    _check_device(device)  # a clear error for a device this machine lacks, before the weights
    return HookedModel(GPT2LMHeadModel.from_pretrained(folder or checkpoint(size)).to(device), tokenizer=None)


@othello_app.command()
def games(n: Annotated[int, typer.Option(help="How many distinct games.")] = 100_000, size: Size = 6,
          seed: int = 0, out: OutDir = Path("othello-games"), overwrite: Overwrite = False) -> None:
    """Random legal games (seeded, deduplicated): OUT/games.npy (uint8 tokens) and OUT/games.json."""
    import io

    import numpy as np

    from mechscope.cli import _clear_errors, console
    from mechscope.organisms.othello import random_games
    from mechscope.result import write_json

    with _clear_errors():
        files = _outputs(out, ["games.npy", "games.json"], overwrite, n=n, size=size)
        start = time.perf_counter()
        g = random_games(n, size=size, seed=seed)
        seconds = time.perf_counter() - start
        buf = io.BytesIO()
        np.save(buf, g.tokens)
        info = {"n": n, "size": size, "seed": seed, "seconds": round(seconds, 2), "games_per_second": round(n / seconds),
                "mean_length": float(g.lengths.mean())}
        _write(out, {files[0]: buf.getvalue(), files[1]: write_json(info, indent=1)})
    console.print(f"{n} games in {seconds:.1f} s ({n / seconds:,.0f} per second)")


@othello_app.command()
def train(games_file: Annotated[Path, typer.Option("--games", help="games.npy from `othello games`.")],
          size: Size = 6, steps: int = 16_000, batch_size: int = 512, lr: float = 1e-3, d_model: int = 128,
          layers: int = 8, heads: int = 8, seed: int = 0, device: DeviceOpt = "cpu",
          precision: Annotated[str, typer.Option(help="fp32, or bf16 autocast (for a GPU).")] = "fp32",
          compile: Annotated[bool, typer.Option(help="torch.compile the model (fuses its small kernels).")] = False,
          out: OutDir = Path("othello-model")) -> None:
    """Train an Othello-GPT (resumes from OUT's last checkpoint): OUT/config.json, model.safetensors,
    curve.json."""
    import numpy as np

    from mechscope.cli import _clear_errors, console
    from mechscope.errors import InputError
    from mechscope.organisms.othello import Games
    from mechscope.organisms.othello.train import PRECISIONS, model_config, train as run

    with _clear_errors():
        if precision not in PRECISIONS:
            raise InputError(f"--precision {precision} is not one of {', '.join(PRECISIONS)}")
        if not games_file.is_file():
            raise InputError(f"--games {games_file} is not a file; make one with `mechscope othello games`")
        try:
            tokens = np.load(games_file)  # no pickles: allow_pickle stays False
        except (ValueError, OSError, EOFError) as err:
            raise InputError(f"{games_file} does not hold {size}x{size} games: it is not a .npy array ({err})") from None
        if tokens.dtype != np.uint8 or tokens.ndim != 2 or tokens.shape[1] != size * size - 4:
            raise InputError(f"{games_file} does not hold {size}x{size} games (uint8 [game, {size * size - 4}])")
        from mechscope.models.load import _check_device

        _check_device(device)
        config = model_config(size, d_model=d_model, n_layers=layers, n_heads=heads)
        run(Games(tokens, size), out, config=config, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            device=device, precision=precision, compile=compile, progress=True, log=console.print)
    console.print(f"trained to step {steps}: {out}")


@othello_app.command()
def evaluate(model: ModelDir = None, size: Size = 6, n: int = 2000, seed: int = 777, out: OutDir = Path("othello-eval"),
             overwrite: Overwrite = False, device: DeviceOpt = "cpu") -> None:
    """Top-1 legal-move rate and legal-set error on fresh games: OUT/evaluate.json."""
    from mechscope.cli import _clear_errors, console
    from mechscope.organisms.othello import random_games
    from mechscope.organisms.othello.train import evaluate as run
    from mechscope.result import write_json

    with _clear_errors():
        files = _outputs(out, ["evaluate.json"], overwrite, n=n, size=size)
        _check_model(model, size)
        result = {"n_games": n, "seed": seed, **run(_model(model, size, device).hf, random_games(n, size=size, seed=seed))}
        _write(out, {files[0]: write_json(result, indent=1)})
    console.print(f"top-1 legal {result['top1_legal']:.2%}, legal-set error {result['legal_set_error']:.2%}")


def _probe_and_intervene(model, size, n, seed, cases, start, out, overwrite, names, device="cpu"):
    """Board probes on n games (seed), then `cases` interventions on other games; writes `names`."""
    from mechscope.cli import _clear_errors, console
    from mechscope.errors import InputError
    from mechscope.organisms.othello import random_games
    from mechscope.organisms.othello.examples import game_record
    from mechscope.organisms.othello.probe import intervene, probe_layers
    from mechscope.report import render
    from mechscope.result import write_json

    with _clear_errors():
        if n < 2:
            raise InputError(f"--n must be at least 2 games: the probes hold some out, not {n}")
        files = _outputs(out, names, overwrite, n=n, size=size)
        _check_model(model, size)
        m = _model(model, size, device)
        t0 = time.perf_counter()
        probe_games = random_games(n, size=size, seed=seed)
        result, probes, acts = probe_layers(m, probe_games, seed=seed, log=lambda text: console.print(f"[dim]{text}[/dim]"))
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result["model"] = str(model) if model else f"the shipped {size}x{size} Othello-GPT"
        # a game the probes were not trained on, for the report
        result["example_game"] = game_record(m, random_games(1, size=size, seed=seed + 2), 0, probes, result["layers"])
        first = m.cfg.n_layers // 2 if start is None else start
        edits = {}
        if cases:
            t0 = time.perf_counter()
            edits = intervene(m, random_games(cases * 3, size=size, seed=seed + 1), probes, probe_games, acts,
                              start=first, n=cases, seed=seed)
            edits["seconds"] = round(time.perf_counter() - t0, 1)
        acts.close()
        data = {"probe.json": write_json(result, indent=1), "intervene.json": write_json(edits, indent=1),
                "report.html": render({**result, "intervene": edits})}
        _write(out, {f: data[f.name] for f in files})
    best = result["layers"].index(result["best_layer"])
    console.print(f"best layer {result['best_layer']}: mine/theirs {result['mine_theirs'][best]:.3f}, black/white "
                  f"{result['black_white'][best]:.3f}, random init {result['random_init_control'][best]:.3f}")
    if edits:
        console.print(f"interventions from layer {first} on {edits['n_cases']} positions: "
                      f"{edits['intervention_success']:.1%} exact legal sets; no edit {edits['none_success']:.1%}; "
                      f"random direction {edits['random_success']:.1%}")


Games_ = Annotated[int, typer.Option("--n", help="Games whose positions train the probes.")]
Start = Annotated[Optional[int], typer.Option(help="First layer edited (default: the middle one).")]


@othello_app.command()
def probe(model: ModelDir = None, size: Size = 6, n: Games_ = 3000, seed: int = 1001,
          intervene: Annotated[int, typer.Option(help="Also run this many interventions (0: none).")] = 0,
          start: Start = None, out: OutDir = Path("othello-probe"), overwrite: Overwrite = False,
          device: DeviceOpt = "cpu") -> None:
    """Board probes at every layer: mine/theirs, black/white and the random-init control; OUT/probe.json
    (and OUT/intervene.json with --intervene N), and OUT/report.html, which draws the boards."""
    names = ["probe.json"] + (["intervene.json"] if intervene else []) + ["report.html"]
    _probe_and_intervene(model, size, n, seed, intervene, start, out, overwrite, names, device)


@othello_app.command("intervene")
def intervene_cmd(model: ModelDir = None, size: Size = 6, n: Games_ = 3000, seed: int = 1001,
                  cases: Annotated[int, typer.Option(help="Positions edited.")] = 200, start: Start = None,
                  out: OutDir = Path("othello-intervene"), overwrite: Overwrite = False,
                  device: DeviceOpt = "cpu") -> None:
    """Flip one square's state through the probes' directions and compare the model's legal moves with
    the edited board's, against no edit and a random direction: OUT/intervene.json (and probe.json, report.html)."""
    _probe_and_intervene(model, size, n, seed, max(cases, 1), start, out, overwrite,
                         ["probe.json", "intervene.json", "report.html"], device)
