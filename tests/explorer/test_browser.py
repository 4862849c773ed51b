"""The explorer in a real browser: `moesae serve` (explorer.launch) on the small build, Debian
Chromium driven by Playwright. Opens every page, checks that no Streamlit exception block is
shown and that each page's key element exists, follows a neighbour link and a map click to a
feature page, and saves screenshots.

By default it serves the small synthetic build and writes screenshots to a temporary folder.
The README's screenshots are this test run on the real demo build:

    MOESAE_BROWSER_DB=data/demo.duckdb MOESAE_SCREENSHOTS=docs/screenshots \
        python -m pytest tests/explorer/test_browser.py
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from explorer import launch

from .browser import free_port, needs_chromium, wait_healthy
from .browser import launch as chromium

SHOTS = Path(os.environ.get("MOESAE_SCREENSHOTS") or tempfile.mkdtemp(prefix="moesae-shots-"))

pytestmark = [pytest.mark.browser, needs_chromium]


@pytest.fixture(scope="module")
def server(build_db):
    port = free_port()
    cmd = launch.command(os.environ.get("MOESAE_BROWSER_DB") or build_db, port=port)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = chromium(pw)
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(30_000)
        yield pg
        browser.close()


def _settle(pg) -> None:
    """Wait until Streamlit has finished running the script (no 'running' widget)."""
    pg.wait_for_selector('[data-testid="stApp"]')
    pg.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=30_000
    )
    pg.wait_for_timeout(400)


def _no_exception(pg, where: str) -> None:
    assert pg.locator('[data-testid="stException"]').count() == 0, (
        f"Streamlit exception on {where}: " + pg.locator('[data-testid="stException"]').first.inner_text()
    )


def _shot(pg, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False, type="png")


KEY = {  # page title in the sidebar → (screenshot name, a selector that must exist)
    "Overview": ("overview", '[data-testid="stDataFrame"]'),
    "Experts": ("experts", ".js-plotly-plot"),
    "Feature map": ("feature_map", ".js-plotly-plot"),
    "Redundancy": ("redundancy", ".js-plotly-plot"),
    "Compare": ("compare", ".js-plotly-plot"),
    "Feature": ("feature", '[data-testid="stPageLink"]'),
    "Search text": ("search_text_empty", '[data-testid="stTextInput"]'),
    "Inspect text": ("inspect_text", "[data-testid=\"stTextArea\"], [data-testid=\"stAlert\"]"),
    "Steering": ("steering", '[data-testid="stTextArea"], [data-testid="stAlert"]'),
}


def _bare_strings() -> list[str]:
    """Every string a page script states on its own (not as a docstring): Streamlit's magic
    would render it as text, so none may reach the page."""
    import ast

    found = []
    for f in (Path(launch.__file__).parent / "views").glob("*.py"):
        tree = ast.parse(f.read_text())
        docstrings = {id(n.body[0]) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef) and n.body}
        for n in ast.walk(tree):
            if (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                    and isinstance(n.value.value, str) and id(n) not in docstrings):
                found.append(" ".join(n.value.value.split())[:40])
    return found


def test_every_page_in_a_browser(server, page):
    notes = _bare_strings() + ["Widget values live in session state"]
    page.goto(f"{server}/?sae=switch")
    _settle(page)
    # Until the first script run registers st.navigation, Streamlit shows the pages/ folder.
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stSidebarNav\"] a')]"
        ".some(a => a.innerText.includes('Feature map'))"
    )
    titles = [t.strip().splitlines()[-1] for t in
              page.locator('[data-testid="stSidebarNav"] a').all_inner_texts()]
    assert set(KEY) <= set(titles), titles
    for title in KEY:
        name, selector = KEY[title]
        page.locator('[data-testid="stSidebarNav"] a').nth(titles.index(title)).click()
        _settle(page)
        page.wait_for_selector(selector)
        _no_exception(page, title)
        shown = page.locator('[data-testid="stMain"]').inner_text()
        assert not [n for n in notes if n in shown], f"a code note is rendered on {title}"
        if title != "Inspect text":  # shot below, on the SAE that has a checkpoint
            _shot(page, name)


def test_inspect_text_runs_live(server, page):
    page.goto(f"{server}/inspect_text?sae=scale-e2")
    page.wait_for_selector("text=Top features at token", timeout=90_000)
    _settle(page)
    # the links to each feature's page come after the heading (the script may still be running
    # when the status widget has not appeared yet): wait for them, fail if they never come
    page.wait_for_selector('[data-testid="stPageLink"]', timeout=30_000)
    _settle(page)
    _no_exception(page, "Inspect text")
    assert page.locator('[data-testid="stPageLink"]').count() > 0
    _shot(page, "inspect_text")


def test_neighbour_link_opens_a_feature(server, page):
    page.goto(f"{server}/feature?sae=switch&feature=3")
    _settle(page)
    page.wait_for_selector("text=switch · feature 3")
    link = page.locator('[data-testid="stPageLink"] a', has_text="cos").first
    target = re.search(r"feature \d+", link.inner_text()).group(0)  # "cos … · feature N · …"
    link.click()
    _settle(page)
    page.wait_for_selector(f"text=switch · {target}")
    _no_exception(page, "neighbour link")
    assert f"feature={target.split()[1]}" in page.url


def test_map_click_opens_a_feature(server, page):
    page.goto(f"{server}/feature_map?sae=switch")
    _settle(page)
    plot = page.locator(".js-plotly-plot").first
    plot.wait_for()
    # Click the drawn point nearest the plot's centre: plotly reports it as a selection.
    box = page.evaluate(
        """() => {
            const gd = document.querySelector('.js-plotly-plot');
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const t = gd._fullData[0];
            const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
            const i = Math.floor(t.x.length / 3);
            return {x: r.left + xa.l2p(t.x[i]), y: r.top + ya.l2p(t.y[i]), id: t.customdata[i]};
        }"""
    )
    page.mouse.click(box["x"], box["y"])
    page.wait_for_selector(f"text=switch · feature {box['id']}", timeout=20_000)
    _settle(page)
    assert f"feature={box['id']}" in page.url
    _no_exception(page, "map selection")
    _shot(page, "feature_from_map")


def test_search_text_in_a_browser(server, page):
    page.goto(f"{server}/search_text?sae=switch")
    _settle(page)
    box = page.locator('[data-testid="stTextInput"] input').first
    box.fill("Lord")
    box.press("Enter")
    page.wait_for_selector("text=Features that fire there")
    _settle(page)
    _no_exception(page, "Search text")
    assert page.locator('[data-testid="stDataFrame"]').count() >= 1
    _shot(page, "search_text")


def test_map_hover_is_readable_and_the_legend_is_clear_of_the_toolbar(server, page):
    page.goto(f"{server}/feature_map?sae=switch")
    _settle(page)
    page.locator(".js-plotly-plot").first.wait_for()
    plot = page.locator(".js-plotly-plot").first
    plot.hover()  # the mode bar shows while the pointer is over the plot
    boxes = page.evaluate(
        """() => {
            const r = s => { const e = document.querySelector(s); if (!e) return null;
                             const b = e.getBoundingClientRect();
                             return {l: b.left, r: b.right, t: b.top, b: b.bottom}; };
            return {legend: r('.js-plotly-plot .legend'), modebar: r('.js-plotly-plot .modebar')};
        }"""
    )
    lg, mb = boxes["legend"], boxes["modebar"]
    assert lg is not None, "the default colouring (domain) has a legend"
    if mb is not None:
        overlap = not (lg["r"] <= mb["l"] or mb["r"] <= lg["l"] or lg["b"] <= mb["t"] or mb["b"] <= lg["t"])
        assert not overlap, boxes
    # hover a drawn point: an opaque white box naming the feature and its expert
    pt = page.evaluate(
        """() => {
            const gd = document.querySelector('.js-plotly-plot');
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, t = gd._fullData[0];
            const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
            const i = Math.floor(t.x.length / 2);
            return {x: r.left + xa.l2p(t.x[i]), y: r.top + ya.l2p(t.y[i])};
        }"""
    )
    page.mouse.move(pt["x"], pt["y"])
    page.wait_for_selector(".hoverlayer .hovertext", timeout=10_000)
    fill = page.evaluate("() => getComputedStyle(document.querySelector('.hoverlayer .hovertext path')).fill")
    text = page.locator(".hoverlayer .hovertext").first.text_content()
    assert fill == "rgb(255, 255, 255)", fill
    assert "feature" in text and "expert" in text, text
    _shot(page, "feature_map_hover")


def test_compare_pair_side_by_side(server, page):
    page.goto(f"{server}/compare?sae=scale-e2")
    _settle(page)
    page.wait_for_selector("text=Only in scale-e2")
    page.wait_for_selector('[data-testid="stPageLink"] >> text=/^switch · feature/')
    _no_exception(page, "Compare")
    links = page.locator('[data-testid="stPageLink"]').all_inner_texts()
    assert any(t.startswith("scale-e2 · feature") for t in links), links
    assert any(t.startswith("switch · feature") for t in links), links
    _shot(page, "compare")
