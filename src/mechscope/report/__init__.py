"""Reports: one self-contained HTML file per study or result, readable offline in any browser.

`write_report(data, path)` takes the IOI study's dict (`ioi.json`) or a result (a `Result` or its
JSON dict); `render(data)` returns the page as a string; `Report(data)` shows it in a notebook."""

from __future__ import annotations

import json
from pathlib import Path

from mechscope.errors import InputError
from mechscope.report import html
from mechscope.report.discovery import discovery_views, edge_scores_views
from mechscope.report.othello import othello_views
from mechscope.report.positions import positions_views
from mechscope.report.views import ioi_views, result_views


def render(data) -> str:
    """The HTML page for a study dict (ioi.json, positions.json, discover.json), a Result, or a Result's dict."""
    if hasattr(data, "to_dict"):
        data = data.to_dict()
    if not isinstance(data, dict):
        raise InputError(f"a report needs a JSON object, not {type(data).__name__}: give an ioi.json or a result JSON")
    try:
        if "circuit" in data and "intermediate" in data:
            subtitle = f"{data['n_prompts']} prompts, seed {data['seed']}, mechscope ioi"
            return html.document(f"IOI circuit of {data['model']}", subtitle, ioi_views(data))
        if "position_baseline" in data and "layers" in data:
            return html.document(f"Word positions in {data['model']}", f"{data['n_prompts']} prompts, mechscope "
                                 "positions", positions_views(data))
        if "curve" in data and "n_edges_total" in data:
            return html.document(f"Circuit of {data['model']} found by {data['method']}", f"{data['n_prompts']} prompts, "
                                 "mechscope discover", discovery_views(data))
        if data.get("axes") == ["edge"] and "graph" in data.get("extra", {}):
            return html.document(f"{data['method']} edge scores on {data['model']}", f"{data['n_prompts']} prompts",
                                 edge_scores_views(data))
        if "mine_theirs" in data and "best_layer" in data:
            return html.document(f"The board inside {data.get('model', 'Othello-GPT')}", f"{data['n_games']} games, "
                                 "mechscope othello", othello_views(data))
        if "values" in data and "axes" in data:
            return html.document(f"{data['technique']} on {data['model']}", f"{data['n_prompts']} prompts",
                                 result_views(data))
    except KeyError as err:
        raise InputError(f"this JSON lacks the field {err}; give an ioi.json or a result JSON as mechscope "
                         "wrote it") from None
    except (TypeError, ValueError, IndexError, AttributeError) as err:
        raise InputError(f"this JSON has a malformed field ({type(err).__name__}: {err}); give an ioi.json or "
                         "a result JSON as mechscope wrote it") from None
    raise InputError("this is neither a study (ioi.json, positions.json, discover.json, othello's probe.json) nor a "
                     "mechscope result JSON")


def write_report(data, path: str | Path) -> Path:
    return html.write(render(data), path)


class Report:
    """A report to show in a notebook (`Report(run_ioi(model))` as a cell's last line) or to save."""

    def __init__(self, data):
        self.page = render(data)

    def _repr_html_(self) -> str:
        return html.iframe(self.page)

    def save(self, path: str | Path) -> Path:
        return html.write(self.page, path)


def source_file(path: str | Path) -> Path:
    """The JSON a report reads: `path` itself, or the study JSON in a folder a study wrote."""
    path = Path(path)
    if path.is_dir():
        studies = ("ioi.json", "positions.json", "discover.json", "probe.json")
        return next((path / f for f in studies if (path / f).is_file()), path / "ioi.json")
    return path


def load(path: str | Path) -> dict:
    """The data of a report source: a result JSON, a study JSON, or the folder a study wrote."""
    path = source_file(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist; give a result JSON or a directory written by `mechscope ioi`")
    data = _read_json(path)
    beside = path.with_name("intervene.json")  # othello: the interventions belong in the probes' report
    if path.name == "probe.json" and isinstance(data, dict) and beside.is_file():
        data["intervene"] = _read_json(beside)
    return data


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not text (it is not UTF-8); give a result JSON or an ioi.json") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not JSON ({err.msg} at line {err.lineno})") from None


__all__ = ["Report", "load", "render", "write_report"]
