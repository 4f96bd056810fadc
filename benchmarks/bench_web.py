"""The web page's speed: first paint, a search round trip in the browser and through the API over a synthetic
index of N images, the viewer's window/level re-render of a 2500x2048 CT (16 bit), and the map of M points
(navigation to the first drawn frame, then a pan or zoom frame).

    python benchmarks/bench_web.py                       # 10k images, the tiny test model; a map of 100k points
    python benchmarks/bench_web.py --images 2000 --repeats 10
    python benchmarks/bench_web.py --only map --map-points 100000

The map's index is written straight through the store (random vectors with the model's identity, six
modalities, twenty folders), its map by `mi map`'s code (PCA).

The index's vectors are random (bench_search's RandomEncoder: the model's identity, random embeddings), so
building it costs the decoding of N tiny PNGs, not N encodings; queries use the real (test) model. Prints
numbers; asserts nothing. Needs Playwright and Debian's Chromium (/usr/bin/chromium) for the browser part.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_search import RandomEncoder, load, percentiles  # noqa: E402

TINY = ROOT / "tests" / "fixtures" / "medimageinsight-tiny"


def big_ct(path: Path) -> None:
    """A 2500x2048 signed 16-bit CT (intercept -1024) from pydicom's CT_small."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm")
    rng = np.random.default_rng(0)
    ds.Rows, ds.Columns = 2048, 2500
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = rng.integers(0, 3000, (2048, 2500)).astype("<i2").tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model", default=str(TINY))
    parser.add_argument("--map-points", type=int, default=100_000)
    parser.add_argument("--only", choices=["search", "map"], help="run one part")
    args = parser.parse_args()
    if args.only != "search":
        map_benchmark(args.map_points, args.model, args.repeats)
    if args.only == "map":
        return

    from PIL import Image

    import indexer
    from encoders import load_model

    print(f"== the web page over {args.images} images, model {args.model}; {os.cpu_count()} CPUs; {load()} ==")
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp, "images")
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images - 1):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(images / f"{i:06d}.png")
        big_ct(images / "big.dcm")
        start = time.perf_counter()
        indexer.index_paths([images], Path(tmp, "index"), model=RandomEncoder(load_model(args.model, device="cpu")))
        print(f"synthetic index built in {time.perf_counter() - start:.0f} s")
        with served(Path(tmp, "index"), args.model) as url:
            api(url, args.repeats)
            browser(url, args.repeats)


@contextlib.contextmanager
def served(index: Path, model: str):
    """A real mi-serve on a free port over `index`: yields its URL once /api/health answers; stopped after."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "retrieval.serve_cli", "--index", str(index), "--model", model,
                               "--port", "0"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = server.stderr.readline().strip().split(" on ")[-1].rstrip("/")
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/api/health", timeout=5).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def new_page(playwright):
    """Debian's Chromium, headless, one 1280x800 page (the browser closes with the playwright context)."""
    chromium = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                          args=["--no-sandbox", "--disable-gpu", "--disable-quic"])
    page = chromium.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(120_000)
    return page


def navigations(page, url: str, ready: str, entry: str, times: int = 5) -> tuple[list[float], list[float]]:
    """Load `url` `times` times: (ms until the `ready` expression holds, as Playwright waits; the page's own
    clock at its performance entry `entry`)."""
    waited, clocked = [], []
    for _ in range(times):
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_function(ready)
        waited.append((time.perf_counter() - start) * 1000)
        clocked.append(page.evaluate(f"performance.getEntriesByName('{entry}')[0].startTime"))
    return waited, clocked


def timed(url: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        body = response.read()
    return (time.perf_counter() - start) * 1000, body


def api(url: str, repeats: int) -> None:
    timed(f"{url}/api/results?q=warm+up")  # loads the text tower
    texts = [f"pleural effusion {i}" for i in range(repeats)]  # distinct: the server keeps texts it has seen
    print(f"GET /api/results (a new text, 24 hits, hit count): "
          f"{percentiles([timed(f'{url}/api/results?' + urllib.parse.urlencode({'q': t}))[0] for t in texts])}")
    print(f"GET /api/facets (cached per generation after the first): "
          f"first {timed(url + '/api/facets')[0]:.1f} ms, then "
          f"{percentiles([timed(url + '/api/facets')[0] for _ in range(repeats)])}")
    hits = json.loads(timed(f"{url}/api/results?q=x&k=200")[1])["hits"]
    big = next(hit["id"] for hit in json.loads(timed(f"{url}/api/results?q=x&k=1&modality=CT")[1])["hits"])
    first, _ = timed(f"{url}/api/images/{big}/render?wc=40&ww=400")
    print(f"2500x2048 CT, first render (decode + window + PNG): {first:.0f} ms")
    windows = [(40 + 7 * i, 400 + 11 * i) for i in range(repeats)]
    full = [timed(f"{url}/api/images/{big}/render?wc={c}&ww={w}")[0] for c, w in windows]
    print(f"2500x2048 CT, window/level re-render at full resolution: {percentiles(full)}")
    small = [timed(f"{url}/api/images/{big}/render?wc={c}&ww={w}&size=1024")[0] for c, w in windows]
    print(f"2500x2048 CT, window/level re-render at 1024 px (while dragging): {percentiles(small)}")
    assert hits  # the index answers


def browser(url: str, repeats: int) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("browser part skipped: Playwright is not installed")
        return
    with sync_playwright() as playwright:
        page = new_page(playwright)
        ready, paints = navigations(page, url + "/", "document.querySelectorAll('#facets .values button').length > 0",
                                    "first-contentful-paint")
        print(f"first contentful paint of the page: {percentiles(paints)}")
        print(f"the page with its facets filled (10k images' folders and values): {percentiles(ready)}")
        page.fill("#q", "warm up")
        page.press("#q", "Enter")
        page.wait_for_selector(".hit")
        times = []
        for i in range(repeats):
            page.fill("#q", f"lumbar spine fracture {i}")
            start = time.perf_counter()
            page.press("#q", "Enter")
            page.wait_for_function(f"document.querySelector('#shown')?.textContent.includes('fracture {i}') && "
                                   "document.querySelectorAll('.hit').length === 24")
            times.append((time.perf_counter() - start) * 1000)
        print(f"search round trip in the browser (Enter to 24 tiles drawn): {percentiles(times)}")


def map_index(folder: Path, n: int, model_source: str) -> None:
    """n images with random vectors (the model's identity), six modalities, twenty folders; then its map (PCA)."""
    from encoders import load_model
    from indexer.store import IndexStore
    from retrieval.curate.imagemap import build_map
    from retrieval.curate.reader import IndexReader

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    model = load_model(model_source, device="cpu")
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((40, model.dim)).astype(np.float32))
    modalities = ["CR", "DX", "CT", "MR", "US", None]
    store = IndexStore.open(folder, create=True)
    store.check_model(model.fingerprint, model.dim, model.source)
    for start in range(0, n, 10_000):
        batch = []
        for i in range(start, min(start + 10_000, n)):
            centre = rng.integers(len(centres))
            vector = unit(centres[centre] + 0.5 * unit(rng.standard_normal(model.dim).astype(np.float32)))
            batch.append({"path": f"/data/site{centre % 20}/{i}.dcm", "size": 1, "mtime_ns": 1, "content_hash": f"h{i}",
                          "images": [{"frame": 0, "embedding": vector, "modality": modalities[centre % 6]}]})
        store.commit(indexed=batch)
    store.write_faiss()
    store.close()
    with IndexReader(folder) as reader:
        build_map(reader, method="pca")


def map_benchmark(n: int, model_source: str, repeats: int) -> None:
    """The map page of n points: from navigation to the first frame drawn (points, colours, legend), then the
    time of a frame while panning (a drag step) and zooming (a wheel step), in the browser."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("map part skipped: Playwright is not installed")
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        map_index(Path(tmp, "index"), n, model_source)
        print(f"== the map of {n} points; {os.cpu_count()} CPUs; {load()} ==")
        print(f"synthetic index and its map (PCA) built in {time.perf_counter() - start:.0f} s")
        with served(Path(tmp, "index"), model_source) as url, sync_playwright() as playwright:
            _, body = timed(url + "/api/map/points")  # the server reads the map once
            print(f"GET /api/map/points: {len(body) / 1e6:.1f} MB; then "
                  f"{percentiles([timed(url + '/api/map/points')[0] for _ in range(5)])}")
            page = new_page(playwright)
            drawn, paints = navigations(page, url + "/?tab=map",
                                        "Number(document.getElementById('map-canvas').dataset.frames) > 0",
                                        "mi-map-drawn")
            print(f"map interactive (navigation to the first frame, as Playwright waits): {percentiles(drawn)}")
            print(f"map interactive (the page's own clock, navigation start to the first frame): {percentiles(paints)}")
            box = page.locator("#map-canvas").bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(x, y)
            page.mouse.down()
            pan, pan_paint = frames(page, repeats, lambda i: page.mouse.move(x + 5 * (i + 1), y + 3 * (i + 1)))
            page.mouse.up()
            zoom, zoom_paint = frames(page, repeats, lambda i: page.mouse.wheel(0, -60 if i % 2 else 50))
            print(f"pan frame (a drag step to the frame drawn): {percentiles(pan)}; painting it: {percentiles(pan_paint)}")
            print(f"zoom frame (a wheel step to the frame drawn): {percentiles(zoom)}; painting it: {percentiles(zoom_paint)}")


def frames(page, repeats: int, act) -> tuple[list[float], list[float]]:
    """(ms from each action to its frame drawn, ms the page spent painting that frame)."""
    whole, painting = [], []
    for i in range(repeats):
        before = int(page.locator("#map-canvas").get_attribute("data-frames"))
        start = time.perf_counter()
        act(i)
        page.wait_for_function(f"Number(document.getElementById('map-canvas').dataset.frames) > {before}")
        whole.append((time.perf_counter() - start) * 1000)
        painting.append(float(page.locator("#map-canvas").get_attribute("data-frame-ms")))
    return whole, painting


if __name__ == "__main__":
    main()
