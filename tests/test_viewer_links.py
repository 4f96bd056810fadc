"""Hits that open in a viewer: `mi-index --viewer-url TEMPLATE` kept in the index, filled for every
PACS hit (a real Orthanc, the tiny model) in the Searcher's hits, mi-search --json and its table,
and mi-serve's /api/search and /api/query answers."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.viewer_links import ViewerTemplateError, checked_template, viewer_url
from orthanc_server import Orthanc, dicom_files, stocked
from raw_sqlite import fetch_rows
from servers import FIXTURE, PYDICOM_FILES, REPO, command_env

KEY = "dicomweb+http://pacs:8042/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"
OHIF = "http://ohif.example/viewer?StudyInstanceUIDs={study}"
CT_SMALL = PYDICOM_FILES / "CT_small.dcm"  # a CT slice OHIF draws (uncompressed)
CHROMIUM = "/usr/bin/chromium"
# As root in a container, offline; OHIF draws with WebGL: SwiftShader gives it one on the CPU.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
ARTIFACTS = Path(os.environ.get("MI_TEST_ARTIFACTS", REPO / "test-artifacts"))


def test_placeholders_are_filled_and_quoted():
    assert viewer_url(OHIF, KEY) == "http://ohif.example/viewer?StudyInstanceUIDs=1.2.3"
    every = "https://v/?s={study}&se={series}&i={instance}&w={wado}"
    assert viewer_url(every, KEY) == ("https://v/?s=1.2.3&se=1.2.3.4&i=1.2.3.4.5&w=http%3A%2F%2Fpacs%3A8042%2F"
                                      "dicom-web%2Fstudies%2F1.2.3%2Fseries%2F1.2.3.4%2Finstances%2F1.2.3.4.5")
    # a value can never add a parameter or a path part
    hostile = "dicomweb+http://pacs/dicom-web/studies/1&admin=1#x/series/2/instances/3"
    assert viewer_url(OHIF, hostile) == "http://ohif.example/viewer?StudyInstanceUIDs=1%26admin%3D1%23x"


def test_no_link_for_files_without_a_template_or_without_a_wado_url():
    assert viewer_url(OHIF, "/data/xrays/a.dcm") is None
    assert viewer_url(None, KEY) is None and viewer_url("", KEY) is None
    dimse = "dimse://ORTHANC@pacs:4242/studies/1.2/series/1.3/instances/1.4"
    assert viewer_url(OHIF, dimse) == "http://ohif.example/viewer?StudyInstanceUIDs=1.2"
    assert viewer_url("http://v/?w={wado}", dimse) is None


@pytest.mark.parametrize("template, says", [
    ("ohif.example/viewer?StudyInstanceUIDs={study}", "http:// or https://"),
    ("http://v/?s={patient}", "{patient}"),
    ("http://v/?s={study!r}", "{study}"),
    ("http://v/?s={study:>20}", "{study}"),
    ("http://v/?s={study", "not a template"),
])
def test_a_bad_template_is_refused_with_what_to_write(template, says):
    with pytest.raises(ViewerTemplateError) as error:
        checked_template(template)
    assert says in str(error.value)
    assert checked_template("") == ""


def test_hit_json_carries_the_link():
    from retrieval.hits import Hit

    row = Hit(1, 0.5, 7, KEY, viewer_url=viewer_url(OHIF, KEY)).to_dict()
    assert row["viewer_url"] == "http://ohif.example/viewer?StudyInstanceUIDs=1.2.3" and row["wado_rs_url"]
    assert "viewer_url" not in Hit(1, 0.5, 7, "/data/a.png").to_dict()


@pytest.fixture(scope="module")
def model():
    from encoders import load_model
    return load_model(FIXTURE, device="cpu")


@pytest.fixture(scope="module")
def pacs_index(tmp_path_factory, model):
    """An index of a real Orthanc's instances (over DICOMweb), and the Orthanc, still running."""
    import indexer

    folder = tmp_path_factory.mktemp("viewer")
    orthanc = Orthanc(folder / "orthanc").start()
    try:
        stocked(orthanc, [CT_SMALL] + [path for path in dicom_files(4) if path.name != CT_SMALL.name][:3])
        indexer.index_dicomweb(orthanc.url, folder / "index", model=model, workers=0)
        yield {"index": folder / "index", "orthanc": orthanc, "folder": folder}
    finally:
        orthanc.stop()


def mi(command: str, *args: str) -> subprocess.CompletedProcess:
    module = {"mi-index": "indexer.cli", "mi-search": "retrieval.cli"}[command]
    return subprocess.run([sys.executable, "-c", f"from {module} import main; main()", *args],
                          env=command_env(MI_MODEL=str(FIXTURE)), capture_output=True, text=True, timeout=300)


def meta(index: Path) -> dict[str, str]:
    return dict(fetch_rows(index, "SELECT key, value FROM meta", readonly=True))


def test_the_template_is_an_index_setting_every_front_end_fills(pacs_index, model):
    from fastapi.testclient import TestClient

    from rich.console import Console

    from retrieval import Searcher
    from retrieval.cli import _print_table
    from retrieval.server import create_app

    index = pacs_index["index"]
    template = "http://127.0.0.1:3000/viewer?StudyInstanceUIDs={study}&SeriesInstanceUIDs={series}"
    searcher = Searcher(index, model=model)  # opened before: the setting is read at each search
    assert all(hit.viewer_url is None for hit in searcher.search("chest", k=10))

    done = mi("mi-index", "--viewer-url", template, "--index", str(index))  # alone, no run
    assert done.returncode == 0, done.stderr
    assert meta(index)["viewer_url"] == template

    hits = searcher.search("chest", k=10)
    assert len(hits) == 4
    for hit in hits:
        study, series = hit.metadata["study_instance_uid"], hit.metadata["series_instance_uid"]
        assert hit.viewer_url == template.format(study=study, series=series)

    listed = mi("mi-search", "chest", "--index", str(index), "--json", "--no-server")
    assert listed.returncode == 0, listed.stderr
    assert sorted(row["viewer_url"] for row in json.loads(listed.stdout)) == sorted(h.viewer_url for h in hits)
    shown = io.StringIO()
    _print_table(hits, Console(file=shown, width=80, color_system=None))  # mi-search's table on a terminal
    lines = shown.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    assert "".join(lines).count("viewer http://127.0.0.1:3000/viewer?StudyInstanceUIDs=") == 4, shown.getvalue()

    client = TestClient(create_app(index, model=model))
    answered = client.get("/api/search", params={"q": "chest", "k": 10}).json()
    assert {row["viewer_url"] for row in answered} == {h.viewer_url for h in hits}
    queried = client.post("/api/query", json={"terms": [{"kind": "text", "text": "chest"}], "k": 10}).json()
    assert {row["viewer_url"] for row in queried["hits"]} == {h.viewer_url for h in hits}

    cleared = mi("mi-index", "--viewer-url", "", "--index", str(index))
    assert cleared.returncode == 0, cleared.stderr
    assert "viewer_url" not in meta(index)
    assert all(hit.viewer_url is None for hit in searcher.search("chest", k=10))
    assert "viewer_url" not in client.get("/api/search", params={"q": "chest"}).json()[0]


def test_a_mistyped_template_is_one_line_and_changes_nothing(pacs_index):
    index = pacs_index["index"]
    before = meta(index)
    done = mi("mi-index", "--viewer-url", "http://v/?s={studyuid}", "--index", str(index))
    assert done.returncode != 0
    assert "{studyuid}" in done.stderr and "Traceback" not in done.stderr
    assert meta(index) == before


def test_a_hit_opens_in_a_real_ohif_viewer(pacs_index, model):
    """A hit's viewer_url, opened in Chromium, makes OHIF (its npm build, served here, reading the
    test Orthanc over DICOMweb) draw the hit's study: a canvas with an image on it, not blank."""
    import numpy as np
    import pydicom
    from PIL import Image

    from indexer.store import IndexStore
    from ohif_viewer import Unavailable, ViewerServer, ohif_dist
    from retrieval import Searcher

    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    try:
        dist = ohif_dist()
    except Unavailable as reason:
        pytest.skip(str(reason))
    with ViewerServer(dist, pacs_index["orthanc"].root) as viewer:
        with IndexStore.open(pacs_index["index"]) as store:
            store.set_viewer_template(viewer.url + "/viewer?StudyInstanceUIDs={study}")
        hits = Searcher(pacs_index["index"], model=model).search("chest", k=10)
        ct = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
        hit = next(h for h in hits if h.metadata["sop_instance_uid"] == ct.SOPInstanceUID)
        assert hit.viewer_url == f"{viewer.url}/viewer?StudyInstanceUIDs={ct.StudyInstanceUID}"

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "ohif-viewer.png"
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(hit.viewer_url)
                canvas = page.locator("canvas.cornerstone-canvas").first
                canvas.wait_for(timeout=90_000)
                skip_tour = page.get_by_text("Skip all")
                drawn = None
                for _ in range(180):  # until the slice is drawn (bounded: about 90 s on a loaded machine)
                    if skip_tour.count():  # OHIF's first-visit tour covers the viewport
                        skip_tour.first.click()
                    box = canvas.bounding_box()
                    if box and box["width"] > 10 and box["height"] > 10:  # what the page shows there
                        pixels = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=box))).convert("L"))
                        if pixels.std() > 20 and len(np.unique(pixels)) > 50:
                            drawn = pixels
                            break
                    page.wait_for_timeout(500)
                if skip_tour.count():
                    skip_tour.first.click()
                    page.wait_for_timeout(300)
                page.screenshot(path=str(shot))
                shown_date = page.get_by_text("19-Jan-2004").count()  # CT_small's study date, in OHIF's overlay
            finally:
                browser.close()
        assert drawn is not None, f"OHIF drew no image for {hit.viewer_url} (see {shot})"
        assert shown_date, f"OHIF shows another study than {ct.StudyInstanceUID} (see {shot})"
