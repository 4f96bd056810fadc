"""The page's dataset views in a real browser against a real mi-serve, compared with what the CLI reports on the same
index (`mi duplicates / leakage / outliers --json`): duplicate clusters side by side and exported, leakage between
two folders with the planted patient and the RG1 near duplicates across, outliers ranked, and the map (legend
counts, the search's hits ringed, a lasso that selects exactly the points inside, a click that opens the viewer).
Every view lives in the URL: back returns to the previous one. Screenshots of each view go to test-artifacts/."""
from __future__ import annotations

import csv
import io
import json
import struct
import urllib.request
from pathlib import Path

import pytest

from browser import open_page, playwright_or_skip, screenshot
from checks_archive import PLANTED_ID, build_checks_archive, cli_json
from servers import start_server, stop_server

sync_api = playwright_or_skip()
expect = sync_api.expect


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    archive = build_checks_archive(tmp_path_factory.mktemp("checks"))
    served = start_server(archive["index"])
    playwright, browser, page = open_page(sync_api, color_scheme="dark")
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield {**archive, "url": served.url, "page": page, "errors": errors}
    browser.close()
    playwright.stop()
    stop_server(served.process)


@pytest.fixture()
def page(checks):
    yield checks["page"]
    assert checks["errors"] == []  # no script error on the way


def thumbnails_drawn(page, within: str) -> None:
    """Every thumbnail in `within` loaded and drawn (rendered on demand: the first view waits for them)."""
    page.wait_for_function(f"[...document.querySelectorAll('{within} img[data-open]')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")


def ids_in(locator) -> list[int]:
    return [int(i) for i in locator.evaluate_all("imgs => imgs.map(i => i.dataset.open)")]


def test_duplicate_clusters_as_the_cli_reports_them_selected_and_exported(page, checks):
    report = cli_json("duplicates", "--index", str(checks["index"]), "--threshold", "0.98")
    page.goto(checks["url"] + "/?tab=duplicates&threshold=0.98")
    cards = page.locator("#dup-clusters .cluster")
    expect(cards).to_have_count(len(report["clusters"]))
    for card, cluster in zip(cards.all(), report["clusters"]):
        assert ids_in(card.locator(".members img[data-open]")) == [m["id"] for m in cluster["members"]]
        assert card.locator(".relations .badge").all_inner_texts() == cluster["relations"]
    rg1 = next(c for c in report["clusters"] if any("RG1_J2KI" in m["path"] for m in c["members"]))
    assert {Path(m["path"]).name for m in rg1["members"]} == {"RG1_UNCR.dcm", "RG1_UNCR_copy.dcm", "RG1_J2KR.dcm",
                                                              "RG1_J2KI.dcm"}
    card = page.locator(f'#dup-clusters .cluster[data-cluster="{rg1["cluster"]}"]')
    expect(card).to_contain_text("same patient")   # each member's relation to the first
    expect(card).to_contain_text("other syntax")
    earlier, later = sorted((m for m in rg1["members"] if "UNCR" in m["path"]), key=rg1["members"].index)
    expect(card.locator(f'img[data-open="{later["id"]}"] ~ .badges')).to_contain_text(f"same file as #{earlier['id']}")
    thumbnails_drawn(page, "#dup-clusters")
    screenshot(page, "checks-duplicates")
    card.get_by_role("button", name="Select members").click()
    expect(page.locator("#dup-selected")).to_have_text("4 images of 1 cluster selected")
    with page.expect_download() as download:
        page.click("#dup-export-csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [int(row["id"]) for row in rows] == [m["id"] for m in rg1["members"]]
    second = rg1["members"][1]["id"]
    card.locator(f'img[data-open="{second}"]').click()
    expect(page.locator("#viewer")).to_have_attribute("data-id", str(second))
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).to_be_hidden()
    page.fill("#dup-threshold", "0.9999")  # a stricter threshold: the noise PNGs' near pair goes
    page.click("#dup-form button[type=submit]")
    strict = cli_json("duplicates", "--index", str(checks["index"]), "--threshold", "0.9999")
    expect(cards).to_have_count(len(strict["clusters"]))
    assert "threshold=0.9999" in page.url


def test_leakage_between_two_folders_shows_the_planted_patient_and_the_pairs(page, checks):
    train, test = (str(checks[name].resolve()) for name in ("train", "test"))
    report = cli_json("leakage", "--index", str(checks["index"]), "--split", f"train={train}", "--split",
                      f"test={test}")
    (pair,) = report["pairs"]
    page.goto(checks["url"] + "/")
    page.get_by_role("tab", name="Leakage").click()
    page.get_by_label("split 1: name").fill("train")
    page.get_by_label("split 1: folder").fill(train)
    page.get_by_label("split 2: name").fill("test")
    page.get_by_label("split 2: folder").fill(test)
    page.get_by_role("button", name="Check for leakage").click()
    card = page.locator(".leak-pair")
    expect(card).to_contain_text("LEAKAGE")
    for check in ("patients", "studies", "exact_duplicates", "near_duplicates"):
        expect(card.locator(f'tr[data-check="{check}"] td').last).to_have_text(str(pair[check]["count"]))
    keys = card.locator('[data-finding="patient"] .key-item').evaluate_all("items => items.map(i => i.dataset.key)")
    assert sorted(keys) == sorted(item["patient"] for item in pair["patients"]["items"])
    near = card.locator('[data-finding="similarity"] .pair').evaluate_all("pairs => pairs.map(p => p.dataset.ids)")
    assert near == [",".join(map(str, item["ids"])) for item in pair["near_duplicates"]["items"]]
    assert pair["near_duplicates"]["count"] > 0  # the RG1 syntaxes, split across the folders
    first = pair["near_duplicates"]["items"][0]
    shown = card.locator(f'.pair[data-ids="{first["ids"][0]},{first["ids"][1]}"]')
    assert ids_in(shown.locator("img[data-open]")) == first["ids"]  # the offending pair, side by side
    assert PLANTED_ID not in page.content()  # pseudonyms only
    thumbnails_drawn(page, "#leak-pairs")
    screenshot(page, "checks-leakage")
    shown.scroll_into_view_if_needed()
    screenshot(page, "checks-leakage-pairs")
    bookmarked = page.url
    assert "split=train" in bookmarked and "tab=leakage" in bookmarked
    page.goto(bookmarked)
    expect(page.locator(".leak-pair")).to_contain_text("LEAKAGE")
    page.get_by_label("split 2: name").fill("")
    page.get_by_role("button", name="Check for leakage").click()
    expect(page.locator("#leak-message")).to_contain_text("at least two splits")


def test_outliers_ranked_as_the_cli_ranks_them(page, checks):
    def ranked(*by: str) -> dict:
        return cli_json("outliers", "--index", str(checks["index"]), "--top", "5", *by)

    def shown_ids() -> list[int]:
        return [int(i) for i in tiles.evaluate_all("ts => ts.map(t => t.dataset.id)")]

    whole = ranked()
    page.goto(checks["url"] + "/?tab=outliers&top=5")
    tiles = page.locator("#out-list .outlier")
    expect(tiles).to_have_count(len(whole["outliers"]))
    assert shown_ids() == [o["id"] for o in whole["outliers"]]
    top = whole["outliers"][0]
    expect(tiles.first).to_contain_text(f'{top["score"]:.2f}')
    expect(tiles.first).to_contain_text(top["reason"])
    assert ids_in(tiles.first.locator(".neighbours img")) == [n["id"] for n in top["neighbours"]]
    page.select_option("#out-by", "folder")
    by_folder = ranked("--by", "folder")
    expect(tiles.first).to_have_attribute("data-id", str(by_folder["outliers"][0]["id"]))
    assert shown_ids() == [o["id"] for o in by_folder["outliers"]]
    expect(tiles.first).to_contain_text(by_folder["outliers"][0]["reason"])
    assert "by=folder" in page.url
    thumbnails_drawn(page, "#out-list")
    screenshot(page, "checks-outliers")
    neighbour = by_folder["outliers"][0]["neighbours"][0]["id"]
    tiles.first.locator(".neighbours img").first.click()
    expect(page.locator("#viewer")).to_have_attribute("data-id", str(neighbour))
    page.keyboard.press("Escape")


def api(checks, path: str) -> bytes:
    with urllib.request.urlopen(checks["url"] + path, timeout=60) as response:
        return response.read()


def map_points(checks) -> dict[int, tuple[float, float]]:
    body = api(checks, "/api/map/points")
    n = len(body) // 12
    ids = struct.unpack(f"<{n}i", body[:4 * n])
    xy = struct.unpack(f"<{2 * n}f", body[4 * n:])
    return {i: (xy[2 * p], xy[2 * p + 1]) for p, i in enumerate(ids)}


def on_screen(page, x: float, y: float) -> tuple[float, float]:
    """Where the page draws the data point (x, y), in the page's coordinates (the canvas says its transform)."""
    box = page.locator("#map-canvas").bounding_box()
    view = page.locator("#map-canvas").evaluate("c => [Number(c.dataset.scale), Number(c.dataset.tx), Number(c.dataset.ty)]")
    scale, tx, ty = view
    return box["x"] + x * scale + tx, box["y"] - y * scale + ty


def test_the_map_legend_hits_lasso_and_click(page, checks):
    points = map_points(checks)
    page.goto(checks["url"] + "/?tab=map&q=chest")
    canvas = page.locator("#map-canvas")
    expect(canvas).to_have_attribute("data-count", str(len(points)))
    page.wait_for_function("hits.length > 0 && document.querySelectorAll('.hit').length === hits.length")
    hits = page.eval_on_selector_all(".hit", "tiles => tiles.map(t => Number(t.dataset.id))")
    assert set(hits) <= set(points) and len(hits) >= 10  # "chest" finds them all (copies as one)
    expect(canvas).to_have_attribute("data-highlighted", str(len(hits)))  # each hit ringed on the map
    colours = json.loads(api(checks, "/api/map/colours?by=modality"))
    expect(page.locator("#map-legend button")).to_have_count(len(colours["values"]))
    legend = dict(zip(page.locator("#map-legend .value").all_inner_texts(),
                      page.locator("#map-legend .n").all_inner_texts()))
    assert legend["CR"] == "6" and legend["none recorded"] == "6"  # 4 RG1 + 2 planted; the PNGs
    page.select_option("#map-by", "folder")
    expect(page.locator("#map-legend .value")).to_have_text(["train", "test"], use_inner_text=True)
    assert "colour=folder" in page.url
    screenshot(page, "checks-map")

    xs = sorted(x for x, _ in points.values())
    ys = sorted(y for _, y in points.values())
    pad_x, pad_y = (xs[-1] - xs[0]) * 0.02, (ys[-1] - ys[0]) * 0.02
    cut = (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2  # the left half of the points, by x
    corners = [(xs[0] - pad_x, ys[0] - pad_y), (cut, ys[0] - pad_y), (cut, ys[-1] + pad_y), (xs[0] - pad_x, ys[-1] + pad_y)]
    inside = sorted(i for i, (x, y) in points.items() if x < cut)
    page.get_by_role("button", name="drag to draw a lasso").click()
    page.mouse.move(*on_screen(page, *corners[0]))
    page.mouse.down()
    for a, b in zip(corners, corners[1:] + corners[:1]):
        for t in (0.25, 0.5, 0.75, 1.0):
            page.mouse.move(*on_screen(page, a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t))
    page.mouse.up()
    expect(page.locator("#map-selected")).to_have_text(f"{len(inside)} in the lasso")
    assert page.evaluate("chosenIds()") == inside
    screenshot(page, "checks-map-lasso")
    page.get_by_role("button", name="Show these").click()
    expect(page.locator(".hit")).to_have_count(len(inside))
    assert sorted(int(i) for i in page.eval_on_selector_all(".hit", "ts => ts.map(t => t.dataset.id)")) == inside
    expect(page.locator("#selected-count")).to_have_text(f"{len(inside)} selected")
    page.go_back()  # back to the map, as it was
    expect(page.get_by_role("tab", name="Map")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#map-selected")).to_have_text(f"{len(inside)} in the lasso")

    page.get_by_role("button", name="drag to draw a lasso").click()  # back to panning
    target = max(points, key=lambda i: points[i][0])  # the rightmost point: nothing else under it
    page.mouse.click(*on_screen(page, *points[target]))
    expect(page.locator("#viewer")).to_have_attribute("data-id", str(target))
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).to_be_hidden()
    before = on_screen(page, *points[target])
    page.mouse.move(before[0] - 200, before[1])
    page.mouse.down()
    page.mouse.move(before[0] - 150, before[1] + 30, steps=4)
    page.mouse.up()
    after = on_screen(page, *points[target])
    assert after == pytest.approx((before[0] + 50, before[1] + 30), abs=1)  # dragged: the map moves with it
    scale = float(canvas.get_attribute("data-scale"))
    page.mouse.wheel(0, -400)
    page.wait_for_function(f"Number(document.getElementById('map-canvas').dataset.scale) > {scale * 1.5}")


def test_views_in_the_url_back_keys_and_names(page, checks):
    page.goto(checks["url"] + "/?tab=duplicates")
    expect(page.locator("#dup-clusters .cluster").first).to_be_visible()
    page.get_by_role("tab", name="Map").click()
    expect(page.locator("#map-canvas")).to_be_visible()
    page.go_back()
    expect(page.get_by_role("tab", name="Duplicates")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#dup-clusters")).to_be_visible()
    expect(page.locator("#map-canvas")).to_be_hidden()
    page.go_forward()
    expect(page.locator("#map-canvas")).to_be_visible()
    page.get_by_role("tab", name="Map").focus()
    page.keyboard.press("ArrowLeft")  # between the tabs by keyboard
    expect(page.get_by_role("tab", name="Outliers")).to_be_focused()
    expect(page.locator("#view-outliers")).to_be_visible()
    assert "tab=outliers" in page.url
    for tab in ("duplicates", "leakage", "outliers", "map"):
        page.goto(checks["url"] + f"/?tab={tab}")
        unnamed = page.evaluate("""() => [...document.querySelectorAll(
                '.dataset-view button, .dataset-view input, .dataset-view select, .dataset-view canvas, #tabs button')]
            .filter(e => e.offsetParent !== null)
            .filter(e => !(e.getAttribute('aria-label') || (e.labels && e.labels.length) || e.textContent.trim()
                           || e.getAttribute('aria-labelledby') || e.title))
            .map(e => e.outerHTML.slice(0, 80))""")
        assert unnamed == [], tab


def test_facets_are_asked_under_the_other_filters(page, checks):
    page.goto(checks["url"] + "/")
    expect(page.locator('.facet[data-filter=modality] button[data-value="CR"]')).to_be_visible()
    with page.expect_response(lambda r: "/api/facets?" in r.url and "modality=CR" in r.url) as answer:
        page.click('.facet[data-filter=modality] button[data-value="CR"]')
    body_parts = answer.value.json()["filters"]["body_part"]["values"]
    shown = page.locator(".facet[data-filter=body_part] .values button")
    expect(shown).to_have_count(len(body_parts))  # what the server counted under modality=CR
    assert shown.evaluate_all("bs => bs.map(b => b.dataset.value + ':' + b.querySelector('.n').textContent)") == \
        [f"{v['value']}:{v['count']}" for v in body_parts]
    expect(page.locator('.facet[data-filter=modality] button[data-value="CR"]')).to_have_attribute("aria-pressed",
                                                                                                 "true")


def test_without_a_map_the_page_says_how_to_make_one(page, checks):
    """Last in the module: it removes the index's map."""
    for path in checks["index"].glob("map.g*.npz"):
        path.unlink()
    page.goto(checks["url"] + "/?tab=map")
    expect(page.locator("#map-message")).to_contain_text("No map yet: run mi map")
