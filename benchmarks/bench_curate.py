"""Dataset checks at scale: mi duplicates, leakage and outliers over synthetic clustered vectors
with planted near duplicates, patients and splits, written through the real store; the kNN
scan's options (--scan-options) and the map's methods (--map) timed on the same index.

    python benchmarks/bench_curate.py                    # 10k and 100k
    python benchmarks/bench_curate.py --sizes 10000
    python benchmarks/bench_curate.py --sizes 1000000    # optional, long
    python benchmarks/bench_curate.py --sizes 100000 --keep /tmp/bench100k   # build once, reuse
    python benchmarks/bench_curate.py --sizes 100000 --keep /tmp/bench100k --scan-options
                                                        # duplicates' kNN scan: IVF nprobe vs exact
    python benchmarks/bench_curate.py --sizes 10000 --keep /tmp/bench --map tsne umap --threads 1

Each check runs in a fresh process (its peak RSS is its own); prints time, peak memory and the
recall of the planted near-duplicate pairs (cosine 0.99, threshold 0.98). Targets on 2 cores:
100k in <= 5 min each, peak <= 4 GB, recall >= 0.99. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

DIM = 1024
STAGES = ("duplicates", "leakage", "outliers", "evaluate")
DUPLICATE_FRACTION = 0.01   # planted near-duplicate pairs per image
PATIENTS_PER_IMAGE = 0.25   # 4 images per patient on average


def build(folder: Path, n: int, seed: int = 0) -> None:
    """n images around n/100 centres (cosine ~0.6 to neighbours, like real embeddings), the last
    n*DUPLICATE_FRACTION of them near duplicates (cosine 0.99) of earlier ones; paths under
    /train or /test by image, patients shared across them by chance."""
    from curate_synthetic import unit
    from indexer.store import IndexStore

    rng = np.random.default_rng(seed)
    planted = int(n * DUPLICATE_FRACTION)
    originals = n - planted
    centres = unit(rng.standard_normal((max(originals // 100, 1), DIM), dtype=np.float32))
    sources = rng.choice(originals, size=planted, replace=False)
    store = IndexStore.open(folder, create=True)
    store.check_model("synthetic", DIM, "synthetic")
    patients = rng.integers(0, max(int(n * PATIENTS_PER_IMAGE), 1), n)
    kept: dict[int, np.ndarray] = {}
    wanted = set(sources.tolist())
    for start in range(0, n, 5000):
        stop = min(start + 5000, n)
        batch = []
        for i in range(start, stop):
            if i < originals:
                v = unit(centres[rng.integers(len(centres))] + 0.8 * unit(rng.standard_normal(DIM, dtype=np.float32))
                         / np.sqrt(1.0))
                if i in wanted:
                    kept[i] = v
            else:
                base = kept[int(sources[i - originals])]
                noise = rng.standard_normal(DIM).astype(np.float32)
                noise -= (noise @ base) * base
                v = unit(0.99 * base + np.sqrt(1 - 0.99 ** 2) * noise / np.linalg.norm(noise))
            split = "train" if i % 5 else "test"
            batch.append({"path": f"/{split}/{i}.dcm", "size": 1, "mtime_ns": 1, "content_hash": f"h{i}",
                          "images": [{"frame": 0, "embedding": v, "sop_instance_uid": f"1.2.{i}",
                                      "study_instance_uid": f"1.3.{i}", "patient_hash": f"{patients[i]:032x}"}]})
        store.commit(indexed=batch)
    store.write_faiss()
    store.close()
    pairs = np.stack([sources + 1, np.arange(originals, n) + 1], axis=1)  # row ids start at 1
    np.save(folder / "planted.npy", pairs)


def scan_options(folder: Path, queries: int) -> None:
    """The duplicates' kNN scan over the first `queries` images against all, one way each: the
    IVF fp16 index with 32, 8, 4 and 2 lists probed, and exact float32 (a flat index: blocked
    GEMM). Prints seconds (extrapolated to all images: the cost is linear in queries) and the
    recall of the planted pairs whose first image is among the queries."""
    from indexer import vectors as vector_index
    from retrieval.curate.reader import IndexReader

    planted = np.load(folder / "planted.npy")
    with IndexReader(folder) as reader:
        index, _ = reader.store.load_faiss_with_generation()
        ids, vectors = next(reader.batches(queries))
        wanted = planted[np.isin(planted[:, 0], ids)]
        n = index.ntotal
        options = [("ivf", p) for p in (32, 8, 4, 2)] + [("exact", None)]
        for kind, nprobe in options:
            start = time.perf_counter()
            if kind == "exact":
                flat = vector_index.build_faiss_index(np.concatenate([v for _, v in reader.batches(8192)]),
                                                      reader.ids(), kind="flat")
                built = time.perf_counter() - start
                search_index = flat
            else:
                built, search_index = 0.0, index
            found = np.concatenate([vector_index.search(search_index, vectors[s:s + 2048], 12, nprobe=nprobe)[1]
                                    for s in range(0, len(vectors), 2048)])
            seconds = time.perf_counter() - start - built
            at = np.searchsorted(ids, wanted[:, 0])
            hit = (found[at] == wanted[:, 1:2]).any(axis=1)
            print(json.dumps({"scan": kind, "nprobe": nprobe, "queries": len(ids), "seconds": round(seconds, 1),
                              "seconds_for_all": round(seconds * n / len(ids) + built, 1), "build_s": round(built, 1),
                              "planted_in_queries": len(wanted), "recall_one_side": round(float(hit.mean()), 4),
                              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}),
                  flush=True)
            del search_index


def map_options(folder: Path, methods: list[str], threads: int) -> None:
    """The map's fit time per method on the PCA-50 coordinates: openTSNE (what mi map uses),
    umap-learn (for comparison: its transform needs the pickled model), PCA alone; and the
    incremental placement of 1% more images (openTSNE's transform against the fitted map)."""
    from retrieval.curate import imagemap
    from retrieval.curate.reader import IndexReader

    with IndexReader(folder) as reader:
        ids = reader.ids()
        start = time.perf_counter()
        mean, components = imagemap._pca(reader, len(ids))
        coords = imagemap._project(reader, ids, mean, components).astype(np.float64)
        pca_s = time.perf_counter() - start
        for method in methods:
            start = time.perf_counter()
            if method == "umap":
                import umap
                model = umap.UMAP(n_components=2, n_jobs=threads).fit(coords)
                fit_s = time.perf_counter() - start
                start = time.perf_counter()
                model.transform(coords[:len(ids) // 100])
            elif method == "tsne":
                from openTSNE import TSNE
                TSNE(perplexity=imagemap.PERPLEXITY, n_jobs=threads, random_state=0).fit(coords)
                fit_s = time.perf_counter() - start
                start = time.perf_counter()
                stored = {"reference_coords": coords, "reference_xy": coords[:, :2], "reference": ids}
                imagemap._place(reader, ids[:len(ids) // 100], {**stored, "mean": mean, "components": components},
                                "tsne", 0, threads)
            elif method == "place":  # placement alone, against a PCA layout (its cost does not depend on it)
                fit_s = 0.0
                stored = {"reference_coords": coords.astype(np.float32), "reference_xy": coords[:, :2],
                          "reference": ids, "mean": mean, "components": components}
                imagemap._place(reader, ids[:len(ids) // 100], stored, "tsne", 0, threads)
            else:
                fit_s = 0.0
            print(json.dumps({"map": method, "threads": threads, "images": len(ids), "pca_s": round(pca_s, 1),
                              "fit_s": round(fit_s, 1),
                              "place_1pct_s": round(time.perf_counter() - start, 1),
                              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}),
                  flush=True)


def stage(name: str, folder: Path) -> None:
    """One check in this process; prints a JSON line with seconds, peak RSS and recall."""
    from retrieval.curate.reader import IndexReader
    from retrieval.curate.splits import Splits

    start = time.perf_counter()
    result: dict = {"stage": name}
    with IndexReader(folder) as reader:
        if name == "duplicates":
            from retrieval.curate.duplicates import find_duplicates
            from retrieval.curate.neighbours import scan
            found = scan(reader, threshold=0.98)
            report = find_duplicates(reader, threshold=0.98, found=found)
            planted = {tuple(p) for p in np.load(folder / "planted.npy").tolist()}
            got = {tuple(p) for p in found.pairs.tolist()}
            result.update(recall=len(planted & got) / max(len(planted), 1), pairs=len(got),
                          clusters=report["summary"]["clusters"], faiss=found.kind)
        elif name == "evaluate":   # labels by id (meaningless values: this times the work, 2000 queries)
            from retrieval.curate.evaluate import evaluate
            from retrieval.curate.labelled import Labels
            ids = reader.ids()
            matrix = np.zeros((len(ids), 5), bool)
            matrix[np.arange(len(ids)), ids % 5] = True
            report = evaluate(reader, Labels(ids, [f"l{i}" for i in range(5)], matrix), k=10, max_queries=2000)
            result.update(queries=report["queries"], map=report["retrieval"]["map"])
        elif name == "outliers":
            from retrieval.curate.outliers import find_outliers
            report = find_outliers(reader, top=20)
            result.update(outliers=len(report["outliers"]), median=report["median_mean_similarity"])
        else:
            from retrieval.curate.leakage import find_leakage
            columns = reader.columns(["path"])
            test = np.asarray(["/test/" in p for p in columns["path"]])
            splits = Splits({"train": columns["id"][~test], "test": columns["id"][test]})
            report = find_leakage(reader, splits, threshold=0.98)
            pair = report["pairs"][0]
            result.update(patients=pair["patients"]["count"], near=pair["near_duplicates"]["count"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--keep", type=Path, help="Build the index here (or reuse the one there) and keep it.")
    parser.add_argument("--scan-options", action="store_true", help="Compare the kNN scan's options instead.")
    parser.add_argument("--map", nargs="+", choices=["tsne", "umap", "pca", "place"], help="Time the map's methods instead.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="--map: threads for the fit.")
    parser.add_argument("--queries", type=int, default=10_000, help="--scan-options: queries timed per option.")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage(args.stage, args.index)
        return
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = (args.keep / str(n)) if args.keep else Path(tmp) / "index"
            if not (folder / "planted.npy").exists():
                start = time.perf_counter()
                build(folder, n)
                print(f"n={n}: built the index in {time.perf_counter() - start:.0f} s", flush=True)
            if args.map:
                map_options(folder, args.map, args.threads)
                continue
            if args.scan_options:
                scan_options(folder, min(args.queries, n))
                continue
            for name in args.stages:
                out = subprocess.run([sys.executable, __file__, "--stage", name, "--index", str(folder)],
                                     capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                print(f"n={n}: {out.stdout.strip() or out.stderr.strip()[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
