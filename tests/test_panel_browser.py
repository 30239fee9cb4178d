"""The panel in a real browser: Debian's chromium, headless, driven by playwright (never a browser
download). The runs table, the loss plot and a sample grid render, and they advance while the run is
written, without a reload.

``PANEL_SCREENSHOT=docs/panel.png`` saves the screenshot there; ``PANEL_RUNS=DIR`` shows a real runs
root in it instead of the test's fake runs (how ``docs/panel.png`` was made).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from panel_fixtures import fake_run, grid, metrics_line

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium (apt-get install chromium)"),
]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]
WAIT_MS = 30_000
X_AXIS = "#loss-plot [aria-label^='X-axis']"  # vega's description: "... with values from 1 to N"


@pytest.fixture
def served(tmp_path):
    """A panel over a finished run and a run being written (the most recent, so selected)."""
    from distill_core.panel.app import build, offline_theme

    root = tmp_path / "runs"
    fake_run(root, "finished-run", 20, state="finished", report=True)
    fake_run(root, "live-run", 7, pid=os.getpid())
    shown = os.environ.get("PANEL_RUNS") or root
    app = build(shown)
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, ssr_mode=False,
                           theme=offline_theme())
    yield root, url
    app.close()


def test_panel_renders_and_follows_a_run_in_chromium(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    root, url = served
    live = root / "live-run"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            table = page.locator("#runs-table")
            if not os.environ.get("PANEL_RUNS"):
                expect(table).to_contain_text("finished-run", timeout=WAIT_MS)
                expect(table).to_contain_text("7 / 20", timeout=WAIT_MS)
            loss = page.locator("#loss-plot svg.marks")
            expect(loss).to_be_visible(timeout=WAIT_MS)
            assert page.locator("#loss-plot .mark-line path").count() >= 2  # one line per student step
            image = page.locator("#sample-grid img")
            expect(image).to_be_visible(timeout=WAIT_MS)
            page.wait_for_function("document.querySelector('#sample-grid img').naturalWidth > 0", timeout=WAIT_MS)
            shot = Path(os.environ.get("PANEL_SCREENSHOT") or tmp_path / "panel.png")
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("PANEL_RUNS"):
                return

            # the run advances in "another process": the page follows within a timer tick or two
            note = page.locator("#run-note")
            expect(note).to_contain_text("live-run", timeout=WAIT_MS)
            expect(page.locator(X_AXIS)).to_have_attribute("aria-label", re.compile("from 1 to 7$"))
            with open(live / "metrics.jsonl", "a") as f:
                f.write("".join(metrics_line(i) for i in range(8, 11)))
            grid(live, 10)
            expect(table).to_contain_text("10 / 20", timeout=WAIT_MS)
            expect(page.get_by_text("iteration 10 (grid 2 of 2)")).to_be_visible(timeout=WAIT_MS)
            expect(page.locator(X_AXIS)).to_have_attribute("aria-label", re.compile("from 1 to 10$"), timeout=WAIT_MS)
        finally:
            browser.close()


def test_the_start_form_follows_autos_choice_in_chromium(served):
    """The form opens on auto's choice for 4 steps; at 1 step the line, the budget and the settings shown are
    those of the method auto picks there."""
    from playwright.sync_api import expect, sync_playwright

    _, url = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_text("start a distillation").click()
            choice = page.locator("#method-choice")
            expect(choice).to_contain_text("auto chose sfd, 220 iterations x batch 64", timeout=WAIT_MS)
            expect(page.get_by_label("iterations")).to_have_value("220")
            steps = page.get_by_label("steps (SFD-v: top of 2..steps)")
            steps.fill("1")
            steps.press("Enter")
            expect(choice).to_contain_text("auto chose kd", timeout=WAIT_MS)
            expect(page.locator("#method-options")).to_contain_text("pair_solver", timeout=WAIT_MS)  # kd's own setting
        finally:
            browser.close()
