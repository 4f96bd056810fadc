"""The web page of mi-serve in a real browser: Debian's Chromium driven by Playwright against a
real server process. Type a query and see thumbnails, filter, upload an image and see it find
itself first, open its details, classify it with typed labels, and "more like this". A
screenshot is kept in test-artifacts/ (or MI_TEST_ARTIFACTS)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from servers import REPO, start_server, stop_server

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

# As root in a container, and offline: no sandbox, no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
ARTIFACTS = Path(os.environ.get("MI_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture()
def page(served):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(30_000)
        sync_api.expect.set_options(timeout=30_000)  # the first search loads the model, on a loaded machine
        yield page
        browser.close()


def thumbnails_loaded(page) -> int:
    """How many result thumbnails the browser has decoded (natural width above zero)."""
    return page.eval_on_selector_all(".hit img", "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length")


def test_search_filter_upload_details_and_more_like_this(page, served, archive):
    expect = sync_api.expect
    page.goto(served.url + "/")
    expect(page.locator("#status")).to_contain_text("7 images")

    page.fill("#q", "chest x-ray")
    page.press("#q", "Enter")
    expect(page.locator(".hit")).to_have_count(7)
    page.wait_for_function("document.querySelectorAll('.hit img').length === 7 && "
                           "[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)")
    assert thumbnails_loaded(page) == 7

    page.fill("input[name=modality]", "CT")
    page.click("button[type=submit]")
    expect(page.locator(".hit")).to_have_count(1)
    expect(page.locator(".hit .meta").first).to_contain_text("CT")
    page.fill("input[name=modality]", "")

    page.set_input_files("#file", str(archive["data"] / "png2.png"))
    expect(page.locator(".hit").first.locator("b")).to_have_text("1.000")  # itself, first
    first = page.locator(".hit").first
    image_id = first.get_attribute("data-id")
    first.click()
    detail = page.locator("#viewer")
    expect(detail).to_be_visible()
    expect(detail).to_contain_text("png2.png")

    page.fill("#labels", "normal, pneumothorax")
    page.press("#labels", "Enter")
    expect(page.locator("#label-results tr.label")).to_have_count(2)
    shown = sum(float(text) for text in page.locator("#label-results tr.label td:nth-child(2)").all_inner_texts())
    assert shown == pytest.approx(1.0, abs=0.011)  # a softmax over the two labels

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-detail.png"))
    page.click("#more")
    expect(detail).to_be_hidden()
    expect(page.locator(".hit").first).to_have_attribute("data-id", image_id)
    expect(page.locator(".hit")).to_have_count(7)
    page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(ARTIFACTS / "web-results.png"), full_page=True)


def test_a_linked_search_and_an_error_in_one_line(page, served):
    page.goto(served.url + "/?q=chest&group=study")
    sync_api.expect(page.locator(".hit").first).to_be_visible()
    assert page.locator("select[name=group]").input_value() == "study"
    page.fill("#q", "chest")
    page.fill("input[name=since]", "2999-01-01")
    page.click("button[type=submit]")
    sync_api.expect(page.locator("#message")).to_contain_text("since 2999-01-01")
    assert page.locator(".hit").count() == 0


def test_an_empty_server_says_so(tmp_path):
    served = start_server(tmp_path / "no-index-yet")
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(served.url + "/")
            sync_api.expect(page.locator("#status")).to_contain_text("no index")
            browser.close()
    finally:
        stop_server(served.process)
    assert not (tmp_path / "no-index-yet").exists()  # serving a missing index creates nothing
