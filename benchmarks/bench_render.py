"""The viewer's window/level re-render of a 2500x2048 CT (16 bit, as bench_web.py builds it), stage by stage in
this process (decode, window, PNG encode, the whole render at full size and at 1024 px) and through a real
mi-serve over an index of that one image (GET /api/images/{id}/render, what the page asks while dragging).

    python benchmarks/bench_render.py                 # 20 windows each
    python benchmarks/bench_render.py --repeats 50 --no-http

The stored values are noise (0..3000 over intercept -1024): the hardest case for PNG's compression, so the
numbers are an upper bound for real images. Prints numbers; asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_search import load, percentiles  # noqa: E402
from bench_web import TINY, big_ct, served, timed  # noqa: E402


def windows(repeats: int) -> list[tuple[float, float]]:
    """A drag: each step a new center and width (nothing a cache of PNGs could answer)."""
    return [(40 + 7 * i, 400 + 11 * i) for i in range(repeats)]


def timings(step, repeats: int) -> list[float]:
    out = []
    for center, width in windows(repeats):
        start = time.perf_counter()
        step(center, width)
        out.append((time.perf_counter() - start) * 1000)
    return out


def in_process(path: Path, repeats: int) -> None:
    from PIL import Image

    from retrieval.server import pixels as rendering

    start = time.perf_counter()
    decoded = rendering.decode_pixels({"id": 1, "path": str(path)})
    print(f"decode (read, pixel data, modality LUT): {(time.perf_counter() - start) * 1000:.0f} ms, "
          f"{decoded.values.dtype} values, {decoded.nbytes / 2**20:.0f} MiB kept in the LRU")
    windowed = timings(lambda c, w: rendering.window(decoded.values, c, w), repeats)
    print(f"window (values -> uint8): {percentiles(windowed)}")
    shown = rendering.window(decoded.values, 40, 400)
    encode = getattr(rendering, "encode_png", None)
    if encode is None:  # the renderer before its own encoder: Pillow's, at compress_level 1
        def encode(grey):
            buffer = io.BytesIO()
            Image.fromarray(grey, "L").save(buffer, "PNG", compress_level=1)
            return buffer.getvalue()
    print(f"PNG encode (2500x2048 grey, {len(encode(shown)) / 2**20:.1f} MiB): "
          f"{percentiles(timings(lambda c, w: encode(rendering.window(decoded.values, c, w)), repeats))} "
          "(window included)")
    print(f"render_png at full resolution: "
          f"{percentiles(timings(lambda c, w: rendering.render_png(decoded, c, w), repeats))}")
    print(f"render_png at 1024 px: "
          f"{percentiles(timings(lambda c, w: rendering.render_png(decoded, c, w, 1024), repeats))}")


def over_http(path: Path, repeats: int, model: str) -> None:
    import indexer
    from encoders import load_model

    index = path.parent / "index"
    indexer.index_paths([path], index, model=load_model(model, device="cpu"), workers=0)
    with served(index, model) as url:
        import json
        image = json.loads(timed(f"{url}/api/results?q=ct&k=1")[1])["hits"][0]["id"]
        first, _ = timed(f"{url}/api/images/{image}/render?wc=40&ww=400")
        print(f"GET render, first (decode + window + PNG): {first:.0f} ms")
        full = [timed(f"{url}/api/images/{image}/render?wc={c}&ww={w}")[0] for c, w in windows(repeats)]
        print(f"GET render, window/level re-render at full resolution: {percentiles(full)}")
        small = [timed(f"{url}/api/images/{image}/render?wc={c}&ww={w}&size=1024")[0] for c, w in windows(repeats)]
        print(f"GET render, window/level re-render at 1024 px (while dragging): {percentiles(small)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model", default=str(TINY))
    parser.add_argument("--no-http", action="store_true", help="only the in-process stages")
    args = parser.parse_args()
    print(f"== window/level of a 2500x2048 CT; {os.cpu_count()} CPUs; {load()} ==")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "images", "big.dcm")
        path.parent.mkdir()
        big_ct(path)
        in_process(path, args.repeats)
        if not args.no_http:
            over_http(path, args.repeats, args.model)


if __name__ == "__main__":
    main()
