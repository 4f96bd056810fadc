"""The web page as a researcher's workspace, in a real browser against a real mi-serve: fields keep their keys,
a slow search shows that it is searching and a stale answer never shows, the query shown is the one searched,
the search lives in the URL (back and forward), paging and the hit count, facets with counts, tiles with
labels, selections, cohorts and exports, nothing loaded from the internet, a dark theme and a name on every
control. Screenshots of each view go to test-artifacts/."""
from __future__ import annotations

import csv
import io
import json
import urllib.parse
from pathlib import Path

import pytest

from browser import open_page, playwright_or_skip, screenshot

sync_api = playwright_or_skip()
expect = sync_api.expect


@pytest.fixture()
def page(served):
    playwright, browser, page = open_page(sync_api)
    yield page
    browser.close()
    playwright.stop()


def search(page, served, text: str = "chest", count: int = 7) -> None:
    page.goto(served.url + "/")
    page.fill("#q", text)
    page.press("#q", "Enter")
    expect(page.locator(".hit")).to_have_count(count)


def test_a_field_keeps_the_slash_it_is_typed(page, served):
    page.goto(served.url + "/")
    page.click("input[name=under]")
    page.keyboard.type("/data/xrays/png")
    assert page.input_value("input[name=under]") == "/data/xrays/png"
    assert page.input_value("#q") == ""
    page.click("h1")  # outside every field, "/" still goes to the query box
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"


def test_a_slow_search_says_so_and_a_stale_answer_never_shows(page, served):
    search(page, served)
    held = []
    page.route("**/api/results?*q=slow*", lambda route: held.append(route))  # answered only when released
    page.fill("#q", "slow query")
    page.press("#q", "Enter")
    expect(page.locator("#loading")).to_be_visible()
    expect(page.locator("#loading")).to_contain_text("Searching")
    expect(page.locator(".hit:visible")).to_have_count(0)  # the old results are not shown under the new query
    screenshot(page, "workspace-loading")
    page.fill("#q", "fast query")
    page.press("#q", "Enter")
    expect(page.locator("#shown")).to_contain_text("fast query")
    expect(page.locator(".hit")).to_have_count(7)
    for route in held:  # the older search answers last: the page has cancelled it
        try:
            route.continue_()
        except Exception:  # noqa: BLE001 - the request was aborted by the page
            pass
    page.wait_for_timeout(500)
    expect(page.locator("#shown")).to_contain_text("fast query")
    expect(page.locator("#shown")).not_to_contain_text("slow query")
    expect(page.locator("#loading")).to_be_hidden()


def test_the_query_shown_is_the_one_searched(page, served, archive):
    search(page, served, "2:chest + ribs")
    expect(page.locator("#shown .chip")).to_have_count(2)
    expect(page.locator("#shown .chip").first).to_contain_text("2×")  # the weight as the server read it
    page.set_input_files("#file", str(archive["data"] / "png2.png"))
    expect(page.locator("#shown .chip.image")).to_contain_text("png2.png")
    page.wait_for_function("document.querySelector('#upload-thumb')?.naturalWidth > 0")  # the query image, shown
    assert page.input_value("#q") == ""  # the old text is not left as if it were searched
    first = page.locator(".hit").first
    image_id = first.get_attribute("data-id")
    first.click()
    page.click("#more")
    expect(page.locator("#shown .chip.like")).to_contain_text(f"like #{image_id}")
    expect(page.locator("#shown .chip.image")).to_have_count(0)
    page.wait_for_function("document.querySelector('#shown .chip.like img').naturalWidth > 0")
    screenshot(page, "workspace-query-shown")


def test_the_search_lives_in_the_url_with_back_and_forward(page, served):
    search(page, served)
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query) == {"q": ["chest"]}
    page.click('.facet[data-filter=modality] button[data-value="MR"]')
    expect(page.locator(".hit")).to_have_count(2)
    assert "modality=MR" in page.url
    linked = page.url
    page.go_back()
    expect(page.locator(".hit")).to_have_count(7)
    assert page.input_value("input[name=modality]") == ""
    page.go_forward()
    expect(page.locator(".hit")).to_have_count(2)
    assert page.input_value("input[name=modality]") == "MR"
    page.goto(linked)  # a bookmark gives the same search
    expect(page.locator(".hit")).to_have_count(2)
    expect(page.locator('.facet[data-filter=modality] button[data-value="MR"]')).to_have_attribute("aria-pressed",
                                                                                                 "true")


def test_k_load_more_and_the_hit_count(page, served):
    page.goto(served.url + "/?q=chest&k=3")
    expect(page.locator(".hit")).to_have_count(3)
    expect(page.locator("#count")).to_have_text("3 hits shown · 7 images match the filters")
    ids = page.eval_on_selector_all(".hit", "tiles => tiles.map(t => t.dataset.id)")
    page.click("#more-results")
    expect(page.locator(".hit")).to_have_count(6)
    page.click("#more-results")
    expect(page.locator(".hit")).to_have_count(7)
    expect(page.locator("#more-results")).to_be_hidden()
    all_ids = page.eval_on_selector_all(".hit", "tiles => tiles.map(t => t.dataset.id)")
    assert all_ids[:3] == ids and len(set(all_ids)) == 7  # pages follow each other, nothing twice
    page.select_option("#k", "24")
    expect(page.locator("#count")).to_have_text("7 hits shown · 7 images match the filters")
    page.fill("input[name=since]", "2999-01-01")
    expect(page.locator("#message")).to_contain_text("since 2999-01-01")
    assert page.evaluate("document.getElementById('message').scrollHeight") < 40  # one line


def test_facets_hold_the_index_values_with_counts(page, served, archive):
    page.goto(served.url + "/")
    modality = page.locator(".facet[data-filter=modality]")
    expect(modality.locator("button")).to_have_count(2)
    expect(modality.locator('button[data-value="MR"]')).to_have_text("MR2")
    expect(modality).to_contain_text("none recorded: 4")
    folder = page.locator(".facet[data-filter=under] button").first
    expect(folder).to_have_attribute("data-value", str(archive["data"].resolve()))
    expect(folder).to_contain_text("7")
    assert page.get_by_label("from").get_attribute("type") == "date"  # the dates are labelled
    assert page.get_by_label("to", exact=True).get_attribute("type") == "date"
    page.fill("#q", "chest")
    page.click('.years button[data-year="2004"]')
    expect(page.locator(".hit")).to_have_count(2)
    assert page.input_value("input[name=since]") == "2004-01-01"
    assert page.input_value("input[name=until]") == "2004-12-31"
    dates = page.eval_on_selector_all(".hit .meta span:first-child", "spans => spans.map(s => s.textContent)")
    assert dates and all(d.startswith("2004") for d in dates if d)
    page.click("#clear-filters")
    expect(page.locator(".hit")).to_have_count(7)
    page.fill("#label-column", "normal, effusion")
    page.press("#label-column", "Enter")
    page.wait_for_function("document.querySelectorAll('.hit .lab').length === 7")
    for labels in page.locator(".hit .lab").all_inner_texts():
        assert "normal" in labels and "effusion" in labels
    screenshot(page, "workspace-facets-labels")


def test_select_tiles_search_like_them_and_export(page, served):
    search(page, served)
    tiles = page.locator(".hit")
    tiles.nth(0).click(modifiers=["Control"])
    tiles.nth(2).click(modifiers=["Shift"])
    tiles.nth(5).focus()
    page.keyboard.press("x")
    expect(page.locator("#selected-count")).to_have_text("4 selected")
    expect(page.locator(".hit[aria-selected=true]")).to_have_count(4)
    chosen = [tiles.nth(i).get_attribute("data-id") for i in (0, 1, 2, 5)]
    screenshot(page, "workspace-selection")
    with page.expect_download() as download:
        page.click("#export-selected-csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [row["id"] for row in rows] == chosen and all(row["path"] and row["score"] for row in rows)
    with page.expect_download() as download:
        page.click("#export-json")
    assert len(json.loads(Path(download.value.path()).read_text())) == 7
    page.click("#like-selected")
    expect(page.locator("#shown .chip.like")).to_have_count(4)
    expect(page.locator(".hit")).to_have_count(7)
    liked = page.eval_on_selector_all("#shown .chip.like", "chips => chips.map(c => c.textContent.match(/#(\\d+)/)[1])")
    assert liked == chosen
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)["like"] == [",".join(chosen)]
    first = page.locator(".hit").first
    away = first.get_attribute("data-id")
    first.click()
    page.click("#less")
    expect(page.locator("#shown .chip.unlike")).to_have_text(f"less like #{away}✕")
    expect(page.locator("#shown .chip.like")).to_have_count(4 - (away in chosen))
    expect(page.locator(".hit")).to_have_count(7)
    assert "unlike=" in page.url


def test_nothing_loads_from_the_internet(page, served, archive):
    asked = []

    def only_loopback(route):
        asked.append(route.request.url)
        host = urllib.parse.urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost", "::1"):
            route.continue_()
        else:
            route.abort()

    page.route("**/*", only_loopback)
    search(page, served)
    page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)")
    page.locator(".hit").first.click()
    page.wait_for_function("document.getElementById('view-img').naturalWidth > 0")
    outside = [url for url in asked if urllib.parse.urlsplit(url).hostname not in ("127.0.0.1", "localhost")
               and not url.startswith(("blob:", "data:"))]
    assert asked and outside == []


def test_dark_theme_toggle_and_a_name_on_every_control(page, served):
    page.emulate_media(color_scheme="dark")
    search(page, served)
    luminance = "(() => { const [r, g, b] = getComputedStyle(document.body).backgroundColor.match(/\\d+/g)" \
                ".map(Number); return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255; })()"
    assert page.evaluate(luminance) < 0.2
    screenshot(page, "workspace-dark")
    page.click("#theme")
    assert page.evaluate(luminance) > 0.8
    page.reload()  # the choice is kept
    assert page.evaluate(luminance) > 0.8
    page.locator(".hit").first.click()
    unnamed = page.evaluate("""() => [...document.querySelectorAll('button, input, select, textarea')]
        .filter(e => !(e.getAttribute('aria-label') || (e.labels && e.labels.length) || e.textContent.trim()
                       || e.getAttribute('aria-labelledby') || e.title))
        .map(e => e.outerHTML.slice(0, 80))""")
    assert unnamed == []
