"""The report page in a real headless browser (Debian's chromium, driven over the DevTools
protocol, tests/report/browser.py): it loads with no console message or exception, every
chart is an SVG with a non-zero size and drawn content, and untrusted names show as text.
A screenshot of the page goes to the test's folder (its path is printed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgecc.report import write_report
from tests.report.browser import CHROMIUM, Browser
from tests.report.test_html_report import EVIL, variants  # noqa: F401  (the fixture)

FIGURES = ("fig-accuracy", "fig-latency", "fig-instructions", "fig-sensitivity-0")
CHARTS = """JSON.stringify([...document.querySelectorAll('figure')].map(f => {
  const s = f.querySelector('svg'), r = s ? s.getBoundingClientRect() : null;
  return {id: f.id, width: r ? r.width : 0, height: r ? r.height : 0,
          drawn: s ? s.querySelectorAll('path, text, use').length : 0,
          text: s ? s.textContent : ''};
}))"""


@pytest.fixture(scope="module")
def browser():
    assert shutil.which(CHROMIUM), "chromium is missing: scripts/setup.sh installs it"
    with Browser(timeout=30) as b:
        yield b
    # always killed, its profile folder removed
    assert b._proc.poll() is not None and not Path(b._profile).exists()


def test_harness_sees_console_errors(browser, tmp_path):
    """The check below is not vacuous: a page that logs an error or throws is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.error('boom'); null.x;</script></body></html>")
    browser.console.clear()
    browser.open(page)
    levels = {level for level, _ in browser.console}
    assert "error" in levels and "exception" in levels, browser.console


def test_report_renders_in_chromium(browser, variants, tmp_path):  # noqa: F811
    out = tmp_path / "report.html"
    write_report(variants, out)
    browser.console.clear()
    browser.open(out)
    charts = json.loads(browser.evaluate(CHARTS))
    assert [c["id"] for c in charts] == list(FIGURES)
    for c in charts:
        assert c["width"] > 100 and c["height"] > 50 and c["drawn"] > 10, c
    assert "m-int8" in charts[1]["text"] and "m-rpi4" in charts[2]["text"]
    # the untrusted names are shown as text, not run as markup
    body = browser.evaluate("document.body.innerText")
    assert EVIL in body and "not measured" in body
    assert browser.evaluate("document.scripts.length") == 0
    shot = browser.screenshot(tmp_path / "report.png")
    print(f"screenshot: {shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert browser.console == [], browser.console

