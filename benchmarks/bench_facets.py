"""The page's facets over a synthetic archive of N images built through the store (10 modalities, 8 body parts,
4 views, 100 folders in 10 groups, ten years of study dates): GET /api/facets with no filter and with the
search's filters (each facet counted under the others), first asked (SQL) and asked again (cached).

    python benchmarks/bench_facets.py                    # N = 100k
    python benchmarks/bench_facets.py --images 1000000 --index /tmp/facets-1m   # kept: built once

Prints numbers; asserts nothing. Numbers on a shared machine: the load average is printed next to them."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import MODALITIES  # noqa: E402
from bench_search import load, percentiles  # noqa: E402

BODY_PARTS = ("CHEST", "HEAD", "ABDOMEN", "PELVIS", "SPINE", "KNEE", "HAND", None)
VIEWS = ("PA", "AP", "LL", None)
DIM = 1024  # as a real index: the rows the scans step over are as wide
BATCH = 5000

ASKED = {
    "no filter": {},
    "modality": {"modality": "CT"},
    "modality + body part": {"modality": "CT", "body_part": "CHEST"},
    "since + until": {"since": "2018-01-01", "until": "2019-12-31"},
    "under a folder group + view": {"under": "/archive/g3", "view": "AP"},
    "all six": {"modality": "CT", "body_part": "CHEST", "view": "PA", "since": "2016", "until": "2020",
                "under": "/archive/g2"},
}


def build(folder: Path, n: int) -> None:
    from indexer.store import IndexStore

    day0 = dt.date(2015, 1, 1)
    rng = np.random.default_rng(0)
    store = IndexStore.open(folder, create=True)
    try:
        store.check_model("synthetic", DIM, "synthetic")
        for first in range(0, n, BATCH):
            vectors = rng.standard_normal((min(BATCH, n - first), DIM)).astype(np.float32)
            items = []
            for offset, vector in enumerate(vectors):
                i = first + offset
                items.append({"path": f"/archive/g{i % 10}/f{i % 100:03d}/img{i:08d}.dcm", "size": 1,
                              "mtime_ns": 1, "content_hash": f"h{i}",
                              "images": [{"frame": 0, "embedding": vector / np.linalg.norm(vector),
                                          "modality": MODALITIES[i % 10], "body_part": BODY_PARTS[i % 8],
                                          "view_position": VIEWS[i % 4],
                                          "study_date": (day0 + dt.timedelta(days=(i * 7919) % 3650)).isoformat()}]})
            store.commit(indexed=items)
        store.write_faiss()
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--index", type=Path, help="build the index here and keep it (reused if there)")
    args = parser.parse_args()
    from fastapi.testclient import TestClient

    from retrieval.server import create_app

    print(f"== facets over {args.images:,} images; {os.cpu_count()} CPUs; {load()} ==")
    with tempfile.TemporaryDirectory() as tmp:
        index = args.index or Path(tmp, "index")
        if not index.exists():
            start = time.perf_counter()
            build(index, args.images)
            print(f"synthetic index built in {time.perf_counter() - start:.0f} s")
        app = create_app(index)
        client = TestClient(app)
        client.get("/api/health")
        for name, filters in ASKED.items():
            first = []
            for _ in range(args.repeats):
                app.state.facets_cache = None  # each one asked anew: the SQL, not the cache
                start = time.perf_counter()
                answer = client.get("/api/facets", params=filters).json()
                first.append((time.perf_counter() - start) * 1000)
            again = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                client.get("/api/facets", params=filters)
                again.append((time.perf_counter() - start) * 1000)
            print(f"{name:28s} ({answer['matching']:>7,} match): SQL {percentiles(first)}; "
                  f"cached p50 {np.percentile(again, 50):.1f} ms")


if __name__ == "__main__":
    main()
