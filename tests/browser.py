"""Shared by the browser tests of the web page: Debian's Chromium driven by Playwright (offline, no sandbox), a
page fixture with generous timeouts (the first search loads the model on a loaded machine), and where the
screenshots go (test-artifacts/, or MI_TEST_ARTIFACTS)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from servers import REPO

CHROMIUM = "/usr/bin/chromium"
# As root in a container, and offline: no sandbox, no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
ARTIFACTS = Path(os.environ.get("MI_TEST_ARTIFACTS", REPO / "test-artifacts"))
TIMEOUT_MS = 30_000


def playwright_or_skip():
    """playwright.sync_api, or the module skipped when Playwright or Chromium is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
    sync_api.expect.set_options(timeout=TIMEOUT_MS)
    return sync_api


def open_page(sync_api, **context):
    """(playwright, browser, page) at 1280x800 (a laptop), each wait up to TIMEOUT_MS."""
    playwright = sync_api.sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True, **context).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return playwright, browser, page


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
