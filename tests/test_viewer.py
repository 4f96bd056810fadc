"""The viewer: renderings of an image's original pixels through the modality LUT at any window/level (checked
against the window computed here from the stored values), the file's own windows, its series and study, and in
a real browser: full resolution, presets, drag to window, zoom, the series strip, readable fields, previous and
next by the arrow keys, Escape. Without a server: the PNG encoder gives back every byte, whole values are kept as
small integers and window the same, and the pixel cache decodes once and stays within its bytes."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import generate_uid

from browser import open_page, playwright_or_skip, screenshot
from servers import FIXTURE, PYDICOM_FILES, start_server, stop_server

SERIES_SLICES = 3
BIG = (500, 600)  # rows, columns: over the 256-pixel thumbnail


def _ct(path, pixels: np.ndarray, study: str, series: str, windows=None) -> None:
    """A CT file from pydicom's CT_small with these stored values (signed 16 bit, intercept -1024)."""
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for name in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
        if name in ds:
            delattr(ds, name)
    if windows:
        ds.WindowCenter = [w[1] for w in windows]
        ds.WindowWidth = [w[2] for w in windows]
        ds.WindowCenterWidthExplanation = [w[0] for w in windows]
    ds.save_as(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study of one 3-slice CT series and one 600x500 CT with two windows of its own, indexed."""
    import indexer
    from encoders import load_model

    root = tmp_path_factory.mktemp("study")
    data = root / "data"
    data.mkdir()
    study_uid, series_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(1)
    for number in range(SERIES_SLICES):
        _ct(data / f"slice{number}.dcm", rng.integers(0, 2400, (64, 64)), study_uid, series_uid)
    ramp = np.tile(np.linspace(0, 2400, BIG[1]).astype(np.int16), (BIG[0], 1))  # -1024 .. 1376 HU, left to right
    _ct(data / "big.dcm", ramp, study_uid, generate_uid(), [("SOFT", 40, 400), ("LUNG", -600, 1500)])
    shutil.copy(PYDICOM_FILES / "MR_small.dcm", data)
    model = load_model(FIXTURE, device="cpu")
    indexer.index_paths([data], root / "index", model=model, workers=0)
    return {"data": data, "index": root / "index", "model": model, "ramp": ramp}


@pytest.fixture(scope="module")
def client(study):
    return TestClient(create_app_for(study))


def create_app_for(study):
    from retrieval.server import create_app
    return create_app(study["index"], model=study["model"])


def _id_of(client, name: str) -> int:
    hits = client.get("/api/results", params={"q": "ct", "k": 10}).json()["hits"]
    return next(hit["id"] for hit in hits if hit["path"].endswith(name))


def _png(response) -> np.ndarray:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_a_window_is_rendered_from_the_values_through_the_modality_lut(client, study):
    big = _id_of(client, "big.dcm")
    shown = _png(client.get(f"/api/images/{big}/render", params={"wc": 40, "ww": 400}))
    assert shown.shape == BIG  # full resolution, not the 256-pixel thumbnail
    hounsfield = study["ramp"].astype(np.float64) - 1024
    expected = np.clip((hounsfield - (40 - 0.5 - 399 / 2)) / 399 * 255, 0, 255)
    assert np.abs(shown.astype(np.float64) - expected).max() <= 1
    lung = _png(client.get(f"/api/images/{big}/render", params={"wc": -600, "ww": 1500}))
    assert (lung > 0).sum() > (shown > 0).sum()  # air is visible in the lung window, black in soft tissue
    small = _png(client.get(f"/api/images/{big}/render", params={"wc": 40, "ww": 400, "size": 300}))
    assert max(small.shape) == 300


def test_the_default_is_the_files_first_window_as_the_indexer_renders_it(client, study):
    from indexer.decode import decode_file

    big = _id_of(client, "big.dcm")
    default = _png(client.get(f"/api/images/{big}/render"))
    indexed = np.asarray(decode_file(study["data"] / "big.dcm").frames[0][1])
    assert np.abs(default.astype(int) - indexed.astype(int)).max() <= 1
    mr = _id_of(client, "MR_small.dcm")
    assert np.abs(_png(client.get(f"/api/images/{mr}/render")).astype(int)
                  - np.asarray(decode_file(study["data"] / "MR_small.dcm").frames[0][1]).astype(int)).max() <= 1


def test_the_view_lists_the_windows_the_series_and_the_study(client):
    big = _id_of(client, "big.dcm")
    view = client.get(f"/api/images/{big}/view").json()
    assert view["width"] == BIG[1] and view["height"] == BIG[0] and view["grey"]
    assert [(w["name"], w["center"], w["width"]) for w in view["windows"]] == [("SOFT", 40, 400), ("LUNG", -600, 1500)]
    assert view["default"]["center"] == 40 and view["range"] == [-1024, 1376]
    assert view["series"] == [big] and len(view["study"]) == SERIES_SLICES
    slice_view = client.get(f"/api/images/{view['study'][0]}/view").json()
    assert len(slice_view["series"]) == SERIES_SLICES and slice_view["study"] == [big]
    paths = [client.get(f"/api/images/{i}").json()["path"] for i in slice_view["series"]]
    assert paths == sorted(paths)


def test_bad_windows_get_one_line(client):
    big = _id_of(client, "big.dcm")
    for params in ({"wc": 40}, {"wc": 40, "ww": 0}, {"size": 10**6}):
        response = client.get(f"/api/images/{big}/render", params=params)
        assert 400 <= response.status_code < 500 and "\n" not in response.json()["error"]
    assert client.get("/api/images/999999/render").json()["error"].startswith("no image with id")


@pytest.fixture(scope="module")
def served_study(study):
    served = start_server(study["index"])
    yield served
    stop_server(served.process)


def test_the_viewer_in_a_browser(served_study, study):
    sync_api = playwright_or_skip()
    expect = sync_api.expect
    playwright, browser, page = open_page(sync_api)
    try:
        page.goto(served_study.url + "/?q=ct%20scan")
        expect(page.locator(".hit")).to_have_count(SERIES_SLICES + 2)
        ids = page.eval_on_selector_all(".hit", "tiles => tiles.map(t => t.dataset.id)")
        big_index = None
        for index, image_id in enumerate(ids):
            path = page.evaluate(f"fetch('/api/images/{image_id}').then(r => r.json()).then(f => f.path)")
            if path.endswith("big.dcm"):
                big_index = index
        big = page.locator(".hit").nth(big_index)
        big.focus()
        page.keyboard.press("Enter")
        viewer = page.locator("#viewer")
        expect(viewer).to_be_visible()
        page.wait_for_function("document.getElementById('view-img').naturalWidth > 0")
        assert page.evaluate("document.getElementById('view-img').naturalWidth") == BIG[1]  # full resolution
        fields = page.locator("#fields").inner_text()
        for name in ("Modality", "Study date", "Series Instance UID", "File"):
            assert name in fields
        for raw in ("content_hash", "source_format", "study_instance_uid"):
            assert raw not in fields
        presets = page.locator("#presets button").all_inner_texts()
        assert presets[:2] == ["SOFT", "LUNG"] and {"Lung", "Bone", "Soft tissue", "Brain"} <= set(presets)
        mean = "(() => { const i = document.getElementById('view-img'); const c = document.createElement('canvas');" \
               " c.width = i.naturalWidth; c.height = i.naturalHeight; const x = c.getContext('2d');" \
               " x.drawImage(i, 0, 0);" \
               " const d = x.getImageData(0, 0, c.width, c.height).data; let s = 0;" \
               " for (let k = 0; k < d.length; k += 4) s += d[k]; return s / (d.length / 4); })()"
        soft = page.evaluate(mean)
        page.click("#presets button:text-is('Lung')")
        page.wait_for_function("document.getElementById('viewer').dataset.rendered.includes('wc=-600')")
        assert page.input_value("#wc") == "-600" and page.input_value("#ww") == "1500"
        assert page.evaluate(mean) > soft + 20  # the user sees the lung window: air no longer black
        screenshot(page, "viewer-lung-window")
        box = page.locator("#stage").bounding_box()
        page.mouse.move(box["x"] + 200, box["y"] + 200)
        page.mouse.down()
        page.mouse.move(box["x"] + 300, box["y"] + 250, steps=5)
        page.mouse.up()
        assert float(page.input_value("#ww")) > 1500 and float(page.input_value("#wc")) > -600  # dragged
        before = page.locator("#zoom-level").inner_text()
        page.click("#zoom-in")
        assert int(page.locator("#zoom-level").inner_text()[:-1]) > int(before[:-1])
        strip = page.locator("#strip img")
        expect(strip).to_have_count(1 + SERIES_SLICES)  # its series (itself) and the rest of the study
        page.keyboard.press("ArrowRight")
        expect(viewer).to_have_attribute("data-id", ids[min(big_index + 1, len(ids) - 1)])
        page.keyboard.press("ArrowLeft")
        expect(viewer).to_have_attribute("data-id", ids[big_index])
        other = page.locator("#strip img").nth(1).get_attribute("data-id")
        page.locator("#strip img").nth(1).click()  # a slice of the study's other series
        page.wait_for_function(f"document.getElementById('viewer').dataset.rendered.includes('/images/{other}/')")
        assert page.evaluate("document.getElementById('view-img').naturalWidth") == 64  # that slice, shown
        page.wait_for_function("document.querySelectorAll('#strip img').length === 4 && "
                               "document.querySelector('#strip img.current') !== null")
        expect(page.locator("#strip .label").first).to_contain_text(f"Series ({SERIES_SLICES})")
        screenshot(page, "viewer-series")
        page.keyboard.press("Escape")
        expect(viewer).to_be_hidden()
        assert page.evaluate("document.activeElement.dataset.index") == str(big_index)  # back on its tile
        page.keyboard.press("ArrowRight")  # the arrows move through the tiles
        assert page.evaluate("document.activeElement.dataset.index") == str(min(big_index + 1, len(ids) - 1))
    finally:
        browser.close()
        playwright.stop()


# ---------------------------------------------------------------- the renderer's parts, without a server

@pytest.mark.parametrize("shape", [(600, 513), (600, 513, 3), (1, 1), (1, 1, 3), (2000, 3), (257, 1)])
def test_the_png_encoder_gives_back_every_byte(shape):
    from retrieval.server.png import encode_png

    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    image[: shape[0] // 2] //= 64  # runs, so that the run-length matching has something to find
    decoded = Image.open(io.BytesIO(encode_png(image)))
    assert decoded.mode == ("RGB" if len(shape) == 3 else "L")
    assert np.array_equal(np.asarray(decoded), image)


def test_whole_values_are_kept_as_small_integers_and_window_the_same():
    from retrieval.server.pixels import compact, window

    hounsfield = np.random.default_rng(2).integers(0, 3000, (300, 200)).astype(np.float64) - 1024
    kept = compact(hounsfield)
    assert kept.dtype == np.int16 and np.array_equal(kept, hounsfield)
    assert compact(hounsfield + 40000).dtype == np.uint16
    assert compact(hounsfield + 0.5).dtype == np.float32  # not whole: floats, nothing rounded
    for center, width in ((40, 400), (-600, 1500), (0, 1)):
        assert np.array_equal(window(kept, center, width), window(hounsfield.astype(np.float32), center, width))
    expected = np.clip((hounsfield - (40 - 0.5 - 399 / 2)) / 399 * 255, 0, 255)
    assert np.abs(window(kept, 40, 400).astype(np.float64) - expected).max() <= 1


def test_the_pixel_cache_decodes_once_keeps_smaller_copies_and_stays_within_its_bytes(monkeypatch):
    import threading

    from retrieval.server import pixels as rendering

    decoded = []

    def decode(fields):
        decoded.append(fields["id"])
        threading.Event().wait(0.05)  # slow enough that the threads below overlap
        return rendering.Pixels(np.zeros((1000, 800), np.int16))

    monkeypatch.setattr(rendering, "decode_pixels", decode)
    cache = rendering.PixelCache(limit_bytes=3 * 1000 * 800 * 2)
    threads = [threading.Thread(target=cache.get, args=({"id": 1, "content_hash": "a"},)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert decoded == [1]  # four renders at once, one decode
    small = cache.get({"id": 1, "content_hash": "a"}, 100)
    assert max(small.values.shape) == 100 and cache.get({"id": 1, "content_hash": "a"}, 100) is small
    assert cache.get({"id": 1, "content_hash": "a"}, 5000).values.shape == (1000, 800)  # no larger copy
    for image_id in range(2, 6):
        cache.get({"id": image_id, "content_hash": "a"})
    assert cache._bytes <= cache.limit and sum(p.nbytes for p in cache._items.values()) == cache._bytes
    cache.get({"id": 1, "content_hash": "a"})
    assert decoded == [1, 2, 3, 4, 5, 1]  # the oldest went first
