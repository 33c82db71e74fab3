"""Reports in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
opens the self-contained HTML file with the network cut off. It must load without console errors or
requests, show a non-empty circuit graph, heatmaps and attention viewer, and a click on a head in a
heatmap must show that head's attention. Screenshots go to the test's temporary directory."""

import os
import shutil

import pytest
import torch

from conftest import ioi_model, tiny_batch, tiny_model
from mechscope.patching import activation_patch, attribution_patch
from mechscope.patching.diagnostics import verify_top_k
from mechscope.report import write_report
from mechscope.studies import Settings, run_ioi

# Every test passes at zero, and the strongest two of each class stay, so that a random model fills
# every class.
LOOSE = Settings(n=8, n_path=4, threshold=0.0, attention_min=0.0, copy_min=0.0, detector_min=0.0,
                 reference_per_template=2, max_per_class=2)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api")
if not os.path.exists(CHROMIUM):
    if os.environ.get("MECHSCOPE_REQUIRE_BROWSER"):
        raise RuntimeError(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package")
    pytest.skip("no Chromium (make test installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


def open_report(browser, path):
    """The page, and the console errors and network requests it made while loading."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url) if r.url != path.as_uri() else None)
    page.route("**/*", lambda route: route.continue_() if route.request.url == path.as_uri() else route.abort())
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, errors, requests


@pytest.fixture(scope="module")
def ioi_report(tmp_path_factory):
    model = ioi_model("llama-gqa", layers=6)
    study = run_ioi(model, LOOSE)
    path = tmp_path_factory.mktemp("ioi") / "report.html"
    write_report(study, path)
    return path, study


def test_ioi_report_in_chromium(browser, ioi_report):
    path, study = ioi_report
    page, errors, requests = open_report(browser, path)
    assert errors == [] and requests == []
    n_found = sum(len(h) for h in study["circuit"].values())
    assert n_found > 0
    assert page.locator("svg.graph .node").count() == n_found + 1  # the heads, and the logits
    assert page.locator("svg.graph .edge").count() > 0
    assert page.locator("svg.heatmap").first.locator("rect.cell").count() == 6 * 4  # layers x heads
    assert page.locator(".attn-box svg.heatmap rect.cell").count() > 0
    page.screenshot(path=str(path.with_suffix(".png")), full_page=True)

    # click head 2.3 in the DLA heatmap: the attention viewer shows it
    page.locator("svg.heatmap[data-title^='Direct logit'] rect.cell[data-row='2'][data-col='3']").click()
    assert page.locator(".attn-title").inner_text().startswith("head 2.3,")
    assert page.locator("select.attn-layer").input_value() == "2" and page.locator("select.attn-head").input_value() == "3"
    # hover shows the weight
    page.locator(".attn-box rect.cell").first.hover()
    assert "query" in page.locator("#ms-tip").inner_text()
    # every heatmap of the study draws
    select = page.locator("select.map-select").first
    for i in range(select.locator("option").count()):
        select.select_option(str(i))
        cells = page.locator(".map-box").first.locator("rect.cell").count()
        assert cells > 0 and cells % 4 == 0  # path patching maps have only the senders' layers
    assert errors == [] and requests == []
    page.screenshot(path=str(path.with_name("report-clicked.png")), full_page=True)


def test_screened_ioi_report_in_chromium(browser, tmp_path):
    """--screen atp: the path-patching maps hold NaN for the senders not path-patched, and a table says
    what the screen checked."""
    model = ioi_model("llama-gqa", layers=6)
    study = run_ioi(model, Settings(**{**LOOSE.__dict__, "screen": "atp", "screen_top": 3, "screen_sample": 1}))
    path = write_report(study, tmp_path / "report.html")
    page, errors, requests = open_report(browser, path)
    table = page.locator("section", has=page.locator("h2", has_text="What the screen path-patched"))
    assert table.locator("tbody tr").count() == len(study["screen"]) > 0
    select = page.locator("select.map-select").first
    for i in range(select.locator("option").count()):  # every map draws, the screened ones included
        select.select_option(str(i))
        assert page.locator(".map-box").first.locator("rect.cell").count() > 0
    assert errors == [] and requests == []


def test_result_report_in_chromium(browser, tmp_path):
    model = tiny_model("gpt2")
    batch = tiny_batch(model)
    exact = activation_patch(model, batch, site="head_z", per_position=True)
    path = write_report(exact, tmp_path / "exact.html")
    page, errors, requests = open_report(browser, path)
    assert errors == [] and requests == []
    assert page.locator("svg.heatmap rect.cell").count() == 3 * 4  # averaged over positions
    page.locator("select.map-select").select_option("1")  # layer x position
    assert page.locator("svg.heatmap rect.cell").count() == 3 * batch.clean.shape[1]
    assert "Top components" in page.content()

    estimate = attribution_patch(model, batch, sites=["head_z"])["head_z"]
    check = verify_top_k(model, batch, estimate, 3)
    estimate.extra["verify"] = {"top": check.top, "sample": check.sample, "max_missed": check.max_missed}
    path = write_report(estimate, tmp_path / "atp.html")
    page, errors, requests = open_report(browser, path)
    assert errors == [] and requests == []
    assert page.locator("svg.scatter circle.point").count() == len(check.top) + len(check.sample)
    page.screenshot(path=str(tmp_path / "atp.png"), full_page=True)


def test_markup_in_the_data_cannot_blank_the_page(browser, tmp_path):
    """A label that says `<!--<script>` (an HTML parser would treat the rest of the page as a script)
    or `</script>` is shown as text, and the heatmap still draws."""
    from mechscope.result import Result

    nasty = ["<!--<script>", "</script><b>bold</b>", "a < b"]
    result = Result(values=torch.tensor([0.5, -1.0, 0.25]), axes=("layer",), labels={"layer": nasty},
                    technique="exact <!--", model="m</script>", n_prompts=1, seconds=0.0)
    path = write_report(result, tmp_path / "nasty.html")
    page, errors, requests = open_report(browser, path)
    assert errors == [] and requests == []
    assert page.locator("svg.heatmap rect.cell").count() == 3
    assert page.locator("b").count() == 0  # markup in the data is never parsed as markup
    assert "<!--<script>" in page.locator("body").inner_text()  # shown as the text it is


def test_positions_report_in_chromium(browser, tmp_path):
    from conftest import bpe_word_model
    from mechscope.studies.positions import PositionSettings, run_positions

    result = run_positions(bpe_word_model(), PositionSettings(n=16, n_words=4, n_ioi=4), heads=["2.1"])
    path = write_report(result, tmp_path / "positions.html")
    page, errors, requests = open_report(browser, path)
    assert errors == [] and requests == []
    assert page.locator("svg.lines path.series").count() == 4  # probe, position, random init, shuffled
    assert page.locator("svg.lines circle.point").count() == 4 * len(result["layers"])
    assert page.locator("svg.heatmap rect.cell").count() == 4 * 4  # the confusion matrix
    page.locator("svg.lines circle.point").first.dispatch_event("mousemove")  # points of equal value overlap
    assert "word-index probe" in page.locator("#ms-tip").inner_text()
    assert "Cross-template patching" in page.content()
    page.screenshot(path=str(tmp_path / "positions.png"), full_page=True)


def test_discovery_report_in_chromium(browser, tmp_path):
    from mechscope.discovery.run import run_discovery

    model = tiny_model("llama-gqa")
    batch = tiny_batch(model)
    record, _ = run_discovery(model, batch, method="eap-ig", steps=2, eval_batch=batch)
    path = write_report(record, tmp_path / "discover.html")
    page, errors, requests = open_report(browser, path)
    assert errors == [] and requests == []
    drawn = min(len(record["circuit"]), 150)
    assert page.locator("svg.graph path.edge").count() == drawn > 0
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    assert page.locator("svg.graph g.node").count() == len({n for e in record["circuit"] for n in _ends(e, group)} | {"logits"})
    assert page.locator("svg.lines circle.point").count() == len(record["curve"]["sizes"])
    assert page.locator("svg.heatmap rect.cell").count() == model.cfg.n_layers * (model.cfg.n_heads + 1)
    page.locator("svg.graph path.edge").first.dispatch_event("mousemove")
    assert "->" not in page.locator("#ms-tip").inner_text() and "score" in page.locator("#ms-tip").inner_text()
    page.screenshot(path=str(tmp_path / "discover.png"), full_page=True)


def _ends(edge: str, group: int) -> tuple[str, str]:
    """The graph's two nodes of an edge: a reader a5.kv1<k is drawn at its group's first head (a5.h2
    with two query heads per key/value head)."""
    w, r = edge.split("->")
    node = r.split("<")[0]
    if ".kv" in node:
        layer, g = node[1:].split(".kv")
        node = f"a{layer}.h{int(g) * group}"
    return w, node


def test_othello_report_in_chromium(browser, tmp_path):
    """The boards: a game whose move slider and layer choice redraw the true and the probed board
    (the red rings are exactly the squares the probes get wrong), and interventions before/after."""
    from conftest import tiny_othello
    from mechscope.organisms.othello import random_games
    from mechscope.organisms.othello.examples import game_record
    from mechscope.organisms.othello.probe import intervene, probe_layers

    model, games = tiny_othello(), random_games(40, seed=7)
    out, probes, acts = probe_layers(model, games)
    out["example_game"] = rec = game_record(model, random_games(1, seed=9), 0, probes, out["layers"])
    out["intervene"] = edits = intervene(model, random_games(30, seed=8), probes, games, acts, start=1, n=6, keep=3)
    acts.close()
    path = write_report(out, tmp_path / "othello.html")
    page, errors, requests = open_report(browser, path)
    assert errors == [] and requests == []
    assert page.locator("svg.board").count() == 4  # the game (true, probed) and one intervention (before, after)
    assert page.locator("svg.lines path.series").count() == 4
    assert page.locator("svg.heatmap rect.cell").count() == 36

    def probed_errors():
        return page.locator(".board-wrap").nth(1).locator("circle.ring").count()

    for move, layer in ((0, "1"), (7, "1"), (7, "embed"), (len(rec["board"]) - 1, "0")):
        page.locator(".move-slider").fill(str(move))
        page.locator(".layer-select").select_option(label=layer)
        L = rec["layers"].index(layer)
        wrong = sum(a != b for a, b in zip(rec["reading"][L][move], rec["board"][move]))
        assert page.locator(".board-title").first.inner_text().startswith(f"after move {move + 1} (")
        assert probed_errors() == wrong and f"{wrong} of 36 squares" in page.locator(".game-info").inner_text()
        # the true board: one disc per occupied square
        assert page.locator(".board-wrap").first.locator("circle.disc").count() == sum(x != 0 for x in rec["board"][move])
    page.locator(".edit-select").select_option("2")
    e = edits["examples"][2]
    after = page.locator(".board-wrap").nth(3)
    assert after.locator("circle.dot").count() == len(e["intervention"]["top"])
    assert after.locator("circle.disc.black").count() == sum(x > 0 for x in e["edited"])
    assert f"case 3: game {e['game']}, move {e['move'] + 1}" in page.locator(".edit-select").inner_text()
    page.screenshot(path=str(tmp_path / "othello.png"), full_page=True)
