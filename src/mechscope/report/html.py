"""One self-contained HTML file: the page, its style and its script inlined, the data as JSON. Nothing
is fetched from a network; any browser opens it offline."""

from __future__ import annotations

import html
import json
from importlib.resources import files
from pathlib import Path

from mechscope.result import json_safe

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body><header><h1 id="ms-title">{title}</h1><div class="sub">{subtitle}</div></header>
<main id="ms-main"></main><div id="ms-tip"></div>
<script type="application/json" id="ms-data">{data}</script>
<script>{js}</script></body></html>
"""


def document(title: str, subtitle: str, views: list[dict]) -> str:
    """The page for a list of views (see report.js for the kinds)."""
    here = files("mechscope.report")
    data = json.dumps(json_safe({"title": title, "views": views}), separators=(",", ":"), allow_nan=False)
    # No "<" at all in the script element: "</script>" would close it and "<!--" can hide its end.
    data = data.replace("<", "\\u003c")
    return PAGE.format(title=html.escape(title), subtitle=html.escape(subtitle), data=data,
                       css=(here / "report.css").read_text(), js=(here / "report.js").read_text())


def iframe(page: str, height: int = 700) -> str:
    """The page inside an iframe, for notebooks: its script runs isolated from the notebook's."""
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{height}px;border:0" '
            'sandbox="allow-scripts"></iframe>')


def write(page: str, path: str | Path) -> Path:
    """Write the page atomically (never over a non-regular file); its folder must exist."""
    from mechscope.outputs import write_file

    return write_file(path, page)
