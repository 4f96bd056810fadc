"""Search speed: cold `mi-search` in a fresh process, warm query latency, ANN recall.

    python benchmarks/bench_search.py                      # everything: 10k and 1M vectors
    python benchmarks/bench_search.py --sizes 10000        # quick
    python benchmarks/bench_search.py --skip-cold          # only the FAISS part
    python benchmarks/bench_search.py --skip-faiss --model tests/fixtures/medimageinsight-tiny
    python benchmarks/bench_search.py --server 10000 --model /tmp/mi-full   # mi-serve only

Prints numbers; asserts nothing. Two kinds of queries are measured against the same index:

- "random": uniformly random unit vectors, the worst case for any ANN index (in 1024-d, random
  points have no neighbours much closer than the rest, so every list looks equally promising);
- "near": an indexed vector plus noise (cosine ~0.7 to it), like a real query whose answer
  exists in the collection (its other 9 neighbours are still random, so recall@10 stays hard);
- "clustered": a collection of vectors around n/100 centres (cosine ~0.64 between neighbours),
  closer to real embeddings, queried with new points from the same clusters.

All are reported; the targets (warm p50 < 20 ms at 1M, recall@10 >= 0.95) are judged honestly
on each.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from indexer.store import vectors  # noqa: E402

DIM = 1024


def load() -> str:
    """Timings on a shared machine mean little without the load next to them."""
    return "load average %.1f %.1f %.1f" % os.getloadavg()


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: no float64 temporaries of the whole array
        block = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        out[start:start + len(block)] = unit(block)
    return out


def near_queries(data: np.ndarray, n: int, cosine: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = data[rng.choice(len(data), size=n, replace=False)]
    noise = unit(rng.standard_normal(base.shape, dtype=np.float32))
    # unit noise is ~orthogonal to base in high dimension: cos(base, q) = cosine
    return unit(cosine * base + np.sqrt(1 - cosine ** 2) * noise).astype(np.float32)


def latencies_ms(index, queries: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Per-query wall times in ms (one query per call, as the API does), and the result ids."""
    vectors.search(index, queries[:1], k, **kwargs)  # warm-up
    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        _, ids = vectors.search(index, q[None], k, **kwargs)
        times.append((time.perf_counter() - start) * 1000)
        found.append(ids[0])
    return np.array(times), np.array(found)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def clustered_unit(n: int, dim: int, seed: int, clusters: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `clusters` random centres (cosine 0.8 to their centre, ~0.64 to each
    other), like embeddings of a collection with many similar studies; and the centres."""
    centres = random_unit(clusters, dim, seed)
    rng = np.random.default_rng(seed + 1)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        size = min(100_000, n - start)
        noise = random_unit(size, dim, seed + 2 + start)
        out[start:start + size] = unit(0.8 * centres[rng.integers(0, clusters, size)] + 0.6 * noise)
    return out, centres


def datasets(n: int, n_queries: int, names: list[str]):
    """(name, data, {query set name: queries}), one data set at a time to bound memory."""
    if "random" in names:
        data = random_unit(n, DIM, seed=0)
        yield "uniform random", data, {"random": random_unit(n_queries, DIM, seed=1),
                                       "near": near_queries(data, n_queries, cosine=0.7, seed=2)}
        del data
    if "clustered" not in names:
        return
    data, centres = clustered_unit(n, DIM, seed=3, clusters=max(10, n // 100))
    picked = centres[np.random.default_rng(4).integers(0, len(centres), n_queries)]
    queries = unit(0.8 * picked + 0.6 * random_unit(n_queries, DIM, seed=5)).astype(np.float32)
    yield "clustered", data, {"clustered": queries}


def bench_faiss(n: int, n_queries: int, k: int, nprobes: list[int], names: list[str]) -> None:
    ids = np.arange(1, n + 1, dtype=np.int64)  # SQLite row ids start at 1
    allowed = ids[::10]                         # a filter keeping 10% of the rows
    for name, data, queries in datasets(n, n_queries, names):
        print(f"\n== {n:,} unit vectors ({name}), D={DIM}, k={k}, one query per call; {load()} ==")
        start = time.perf_counter()
        flat = vectors.build_faiss_index(data, ids, kind="flat")
        print(f"build flat: {time.perf_counter() - start:.1f} s")
        truth = {q_name: flat.search(q, k)[1] for q_name, q in queries.items()}  # batched exact
        n_exact = min(n_queries, 50 if n > 200_000 else n_queries)
        for q_name, q in queries.items():
            t, _ = latencies_ms(flat, q[:n_exact], k)
            print(f"exact            {q_name:9s} p50 {np.percentile(t, 50):7.2f} ms  p95 {np.percentile(t, 95):7.2f} ms")
        q_name, q = next(iter(queries.items()))
        t, found = latencies_ms(flat, q[:n_exact], k, allowed_ids=allowed)
        print(f"exact, filter 10% {q_name:8s} p50 {np.percentile(t, 50):7.2f} ms  p95 {np.percentile(t, 95):7.2f} ms"
              f"  (k hits, all allowed: {bool(np.isin(found, allowed).all())})")
        del flat

        nlist = vectors.ivf_lists(n)
        start = time.perf_counter()
        ivf = vectors.build_faiss_index(data, ids, kind="ivf")
        print(f"build ivf (IVF{nlist},SQfp16): {time.perf_counter() - start:.1f} s")
        for nprobe in nprobes:
            for q_name, q in queries.items():
                t, found = latencies_ms(ivf, q, k, nprobe=nprobe)
                default = " (default)" if nprobe == vectors.DEFAULT_NPROBE else ""
                print(f"ivf nprobe={nprobe:<4d}   {q_name:9s} p50 {np.percentile(t, 50):7.2f} ms  "
                      f"p95 {np.percentile(t, 95):7.2f} ms  recall@{k} {recall_at(found, truth[q_name]):.3f}{default}")
        if "near" in queries:
            _, found = latencies_ms(ivf, queries["near"], 1)
            source_rows = _near_sources(n, n_queries)
            print(f"ivf default      near      the indexed vector each query was made from is hit 1: "
                  f"{np.mean(found[:, 0] == ids[source_rows]):.3f}")
        q_name, q = list(queries.items())[-1]
        t, found = latencies_ms(ivf, q, k, allowed_ids=allowed)
        print(f"ivf, filter 10%  {q_name:9s} p50 {np.percentile(t, 50):7.2f} ms  p95 {np.percentile(t, 95):7.2f} ms"
              f"  recall@{k} {recall_at(found, _filtered_truth(data, ids, allowed, q, k)):.3f}"
              f"  (all allowed: {bool(np.isin(found, allowed).all())})")
        del ivf, data


def _near_sources(n: int, n_queries: int) -> np.ndarray:
    return np.random.default_rng(2).choice(n, size=n_queries, replace=False)  # as in near_queries


def _filtered_truth(data, ids, allowed, queries, k):
    rows = np.searchsorted(ids, allowed)
    scores = queries @ data[rows].T
    return allowed[np.argsort(-scores, axis=1)[:, :k]]


def bench_cold(model: str) -> None:
    """Index a few generated images with `model`, then time `mi-search "text"` in fresh processes."""
    from PIL import Image

    import indexer

    print(f"\n== cold mi-search, model {model}; {load()} ==")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp, "images")
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(images / f"{i}.png")
        index_dir = Path(tmp, "index")
        indexer.index_paths([images], index_dir, model=model)
        cmd = [sys.executable, "-m", "retrieval.cli", "chest x-ray", "--index", str(index_dir),
               "--model", model, "--json"]
        for label, argv in [("python -c 'import retrieval.cli'",
                             [sys.executable, "-c", "import retrieval.cli"]),
                            ('mi-search "chest x-ray" --json', cmd)]:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True)
                times.append(time.perf_counter() - start)
            print(f"{label}: best {min(times):.2f} s, median {np.median(times):.2f} s (3 runs)")

        from retrieval import Searcher  # warm: one Searcher, model loaded once, many queries
        with Searcher(index=index_dir, model=model) as searcher:
            for label, query in [("text", {"query": "chest x-ray"}), ("image", {"image": images / "0.png"})]:
                searcher.search(k=10, **query)  # loads the tower
                times = []
                for _ in range(20):
                    start = time.perf_counter()
                    searcher.search(k=10, **query)
                    times.append((time.perf_counter() - start) * 1000)
                print(f"warm Searcher.search, {label} query (encode + search + rows): "
                      f"p50 {np.percentile(times, 50):.1f} ms  p95 {np.percentile(times, 95):.1f} ms")


class RandomEncoder:
    """The model's identity (fingerprint, dimension, preprocessing) with random unit vectors as
    embeddings: builds a large index for the server's latency quickly; queries use the real model."""

    def __init__(self, model) -> None:
        self.preprocess, self.dim, self.device, self.source = model.preprocess, model.dim, model.device, model.source
        self.fingerprint = model.fingerprint
        self.rng = np.random.default_rng(0)

    def encode_pixels(self, pixels) -> np.ndarray:
        return unit(self.rng.standard_normal((len(pixels), self.dim)).astype(np.float32))

    encode_resized = encode_pixels

    def start_encoding(self, resized):
        import torch
        from encoders.inference import PendingEmbeddings
        return PendingEmbeddings(torch.from_numpy(self.encode_resized(resized)), None)


def percentiles(times: list[float]) -> str:
    return f"p50 {np.percentile(times, 50):.1f} ms  p95 {np.percentile(times, 95):.1f} ms  ({len(times)} queries)"


def bench_server(model: str, n: int, repeats: int) -> None:
    """A warm mi-serve over n images: API latency of text queries and image uploads, and the
    wall time of `mi-search "text"` as a fresh process answered by it (and without it)."""
    import io
    import json
    import shutil
    import urllib.parse
    import urllib.request

    from PIL import Image

    import indexer
    from encoders import load_model

    print(f"\n== mi-serve over {n} images, model {model}; {os.cpu_count()} CPUs; {load()} ==")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp, "images")
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(images / f"{i:06d}.png")
        index_dir = Path(tmp, "index")
        indexer.index_paths([images], index_dir, model=RandomEncoder(load_model(model, device="cpu")))
        from bench_web import served  # here: bench_web imports this module

        with served(index_dir, model) as url:
            def timed(request) -> float:
                start = time.perf_counter()
                with urllib.request.urlopen(request, timeout=600) as response:
                    response.read()
                return (time.perf_counter() - start) * 1000

            words = ["pleural effusion", "lumbar spine fracture", "cardiomegaly", "pneumothorax", "normal chest"]
            # distinct texts for every measurement: the server keeps the embeddings of texts it has seen
            texts, posted, fresh = ([f"{words[i % len(words)]} {part} {i}" for i in range(repeats + 1)]
                                    for part in ("get", "post", "cli"))
            timed(f"{url}/api/search?q=warm+up&k=10")  # loads the text tower
            latencies = [timed(f"{url}/api/search?" + urllib.parse.urlencode({"q": text, "k": 10})) for text in texts]
            print(f"warm text query, GET /api/search: {percentiles(latencies)}")
            body = lambda text: json.dumps({"terms": [{"kind": "text", "text": text}], "k": 10}).encode()  # noqa: E731
            latencies = [timed(urllib.request.Request(f"{url}/api/query", data=body(text),
                                                      headers={"Content-Type": "application/json"}))
                         for text in posted]
            print(f"warm text query, POST /api/query (what mi-search sends): {percentiles(latencies)}")
            latencies = [timed(f"{url}/api/search?" + urllib.parse.urlencode({"q": texts[0], "k": k}))
                         for k in [10, 20] * (repeats // 2 + 1)]
            print(f"the same text again with other options (its embedding kept): {percentiles(latencies)}")

            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8)).save(png, "PNG")
            boundary = "mi-bench-boundary"
            upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
                      f"Content-Type: image/png\r\n\r\n").encode() + png.getvalue() + f"\r\n--{boundary}--\r\n".encode()
            request = lambda: urllib.request.Request(  # noqa: E731
                f"{url}/api/search", data=upload, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            timed(request())  # loads the image tower
            latencies = [timed(request()) for _ in range(max(3, repeats // 10))]
            print(f"warm image upload (512x512 PNG), POST /api/search: {percentiles(latencies)}")

            mi_search = shutil.which("mi-search")
            argv = [mi_search] if mi_search else [sys.executable, "-m", "retrieval.cli"]
            for label, extra in (("through the server", []), ("--no-server (cold, in the process)", ["--no-server"])):
                times = []
                for text in (fresh[:5] if not extra else fresh[5:10]):
                    start = time.perf_counter()
                    subprocess.run(argv + [text, "--index", str(index_dir), *extra], env=env, check=True,
                                   capture_output=True)
                    times.append(time.perf_counter() - start)
                print(f'mi-search "text" as a fresh process, {label}: best {min(times):.2f} s, '
                      f"median {np.median(times):.2f} s (5 runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,1000000", help="comma-separated collection sizes")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--nprobe", default="16,32,48,64,128", help="comma-separated nprobe values to try")
    parser.add_argument("--datasets", default="random,clustered", help="random and/or clustered")
    parser.add_argument("--model", default=str(ROOT / "tests/fixtures/medimageinsight-tiny"))
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--server", type=int, metavar="N", default=0,
                        help="only mi-serve: latency over an index of N images (random vectors, real model)")
    parser.add_argument("--repeats", type=int, default=50, help="warm queries per measurement (--server)")
    args = parser.parse_args()
    if args.server:
        return bench_server(args.model, args.server, args.repeats)

    import faiss
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
          f"GPUs: {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}")
    print(__doc__.split("\n\n", 2)[2].strip())
    if not args.skip_cold:
        bench_cold(args.model)
    if not args.skip_faiss:
        for n in (int(s) for s in args.sizes.split(",")):
            bench_faiss(n, args.queries, args.k, [int(p) for p in args.nprobe.split(",")],
                        args.datasets.split(","))


if __name__ == "__main__":
    main()
