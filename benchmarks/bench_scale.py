"""A hospital's archive on one machine (issue 20): an index of N synthetic images built through the
store (1024-d clustered vectors, 10 modalities, 100 folders, ten years of study dates), then the
latency of unfiltered and filtered searches through a Searcher, their recall@10 against brute force,
the time to add 1% and one image (and until a running Searcher sees it), to `--remove` 10%, and
the peak RSS (`--search-only`: the searches alone, the kept index left as it is; `--server`: the same
searches through a real mi-serve too); `--walk-files N` times an unchanged re-run's planning,
`--series N` series vectors.

    python benchmarks/bench_scale.py                     # N = 100k
    python benchmarks/bench_scale.py --images 1000000 --keep /tmp/idx1m
    python benchmarks/bench_scale.py --images 1000000 --keep /tmp/idx1m --search-only --server   # reuse it
    python benchmarks/bench_scale.py --images 10000000 --keep /tmp/idx10m --search-only --server --rebuild
        # 10M: ~57 min through the store and ~20 min of FAISS on 2 cores, 26 GB of disk; the data is made a
        # chunk at a time (any chunk again the same), and the brute-force truth is kept in the temporary folder

Numbers on a shared machine: the load average is printed next to them."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_search import DIM, clustered_unit, load, random_unit, unit  # noqa: E402

MODALITIES = ("CR", "DX", "CT", "MR", "US", "MG", "NM", "PT", "XA", "RF")
FOLDERS = 100
BATCH = 5000


class Archive:
    """N synthetic image vectors made a chunk at a time, any chunk again the same: unit vectors at
    cosine 0.8 to one of N/100 random centres (as bench_search.clustered_unit), without holding all N
    in memory (41 GB of float32 at 10M; the centres take 0.4 GB there)."""

    CHUNK = 100_000

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.centres = random_unit(max(100, n // 100), DIM, seed)

    def __len__(self) -> int:
        return self.n

    def chunk(self, number: int) -> np.ndarray:
        start = number * self.CHUNK
        size = min(self.CHUNK, self.n - start)
        rng = np.random.default_rng([self.seed, number])
        picked = self.centres[rng.integers(0, len(self.centres), size)]
        noise = unit(rng.standard_normal((size, DIM), dtype=np.float32))
        return unit(0.8 * picked + 0.6 * noise).astype(np.float32)

    def chunks(self):
        """(first position, vectors) for every chunk in order."""
        for number in range(-(-self.n // self.CHUNK)):
            yield number * self.CHUNK, self.chunk(number)

    def rows(self, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), DIM), dtype=np.float32)
        for number in np.unique(positions // self.CHUNK):
            inside = positions // self.CHUNK == number
            out[inside] = self.chunk(int(number))[positions[inside] - number * self.CHUNK]
        return out

    def near_queries(self, count: int, cosine: float, seed: int) -> np.ndarray:
        """Queries at `cosine` to `count` random images (bench_search.near_queries, streamed)."""
        rng = np.random.default_rng(seed)
        base = self.rows(rng.choice(self.n, size=count, replace=False))
        noise = unit(rng.standard_normal(base.shape, dtype=np.float32))
        return unit(cosine * base + np.sqrt(1 - cosine ** 2) * noise).astype(np.float32)


def batches(data):
    """(first position, vectors) BATCH at a time from an array or an Archive."""
    if isinstance(data, Archive):
        for first, chunk in data.chunks():
            for at in range(0, len(chunk), BATCH):
                yield first + at, chunk[at:at + BATCH]
    else:
        for first in range(0, len(data), BATCH):
            yield first, data[first:first + BATCH]


def memory_peak_gb() -> str:
    """This process's peak and current resident memory (VmHWM, VmRSS), and the anonymous part now."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    gb = {key: int(status[key].split()[0]) / 1e6 for key in ("VmHWM", "VmRSS", "RssAnon")}
    return f"peak RSS {gb['VmHWM']:.2f} GB (now {gb['VmRSS']:.2f}, anonymous {gb['RssAnon']:.2f})"


def rows(start: int, vectors: np.ndarray, root: str) -> list[dict]:
    """Store items for images start.. (one file per image)."""
    day0 = dt.date(2015, 1, 1)
    items = []
    for offset, vector in enumerate(vectors):
        i = start + offset
        path = f"{root}/f{i % FOLDERS:03d}/img{i:08d}.dcm"
        items.append({"path": path, "size": 1, "mtime_ns": 1, "content_hash": f"h{i}",
                      "images": [{"frame": 0, "embedding": vector, "modality": MODALITIES[i % 10],
                                  "study_date": (day0 + dt.timedelta(days=(i * 7919) % 3650)).isoformat()}]})
    return items


def build(store, data, root: str) -> float:
    """Commit `data` (an array or an Archive) BATCH images at a time, then write the FAISS file;
    progress every million images."""
    start = time.perf_counter()
    for first, vectors in batches(data):
        store.commit(indexed=rows(first, vectors, root))
        done = first + len(vectors)
        if done % 1_000_000 == 0 and done < len(data):
            print(f"  {done:,} committed: {time.perf_counter() - start:.0f} s, {memory_peak_gb()}  {load()}", flush=True)
    store.record_run([root], 0.0)
    committed = time.perf_counter() - start
    store.write_faiss()
    print(f"  committed in {committed:.0f} s, FAISS file in {time.perf_counter() - start - committed:.0f} s", flush=True)
    return time.perf_counter() - start


def storage(folder: Path, n: int, rebuild: bool) -> None:
    """Disk per image by file (holes in the vector file take none), and (`rebuild`) the FAISS rebuild
    from the stored vectors alone in a fresh process: its time and peak RSS."""
    import subprocess

    sizes = {p.name.split(".")[0] + "".join(p.suffixes[-1:]): min(p.stat().st_size, p.stat().st_blocks * 512)
             for p in folder.iterdir() if p.is_file()}
    parts = ", ".join(f"{name} {size / n:,.0f} B" for name, size in sorted(sizes.items()) if size)
    print(f"disk per image: {sum(sizes.values()) / n:,.0f} B ({parts})", flush=True)
    if not rebuild:
        return
    for cached in folder.glob("vectors.*"):
        cached.unlink()
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (it survives exec), which here
    # holds the benchmark's vectors; VmHWM belongs to the child's own address space.
    code = ("import re, sys, time; sys.path.insert(0, sys.argv[2]); from indexer.store import IndexStore; "
            "s = IndexStore.open(sys.argv[1]); t = time.perf_counter(); s.write_faiss(); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "print(f'{time.perf_counter() - t:.1f} {hwm / 1e6:.2f}')")
    took, peak = subprocess.run([sys.executable, "-c", code, str(folder), str(Path(__file__).parents[1])],
                                check=True, capture_output=True, text=True).stdout.split()
    print(f"FAISS rebuilt from the stored vectors in a fresh process: {took} s, peak RSS {peak} GB", flush=True)


def brute(archive: Archive, masks: list, queries: np.ndarray, k: int) -> list[list[set[int]]]:
    """The exact top-k ids (SQLite ids are 1-based positions here) of every query, for each mask
    (None: every row), in one pass over the archive's chunks (made again: 41 GB at 10M)."""
    queries = np.asarray(queries, np.float32)
    best = [[(np.empty(0, np.int64), np.empty(0, np.float32))] * len(queries) for _ in masks]
    for first, chunk in archive.chunks():
        scores = chunk @ queries.T  # (rows, queries)
        positions = np.arange(first, first + len(chunk))
        for kept, mask in zip(best, masks):
            inside = slice(None) if mask is None else mask[first:first + len(chunk)]
            ids, part = positions[inside], scores[inside]
            for q in range(len(queries)):
                top_ids = np.concatenate([kept[q][0], ids])
                top = np.concatenate([kept[q][1], part[:, q]])
                cut = np.argpartition(-top, k)[:k] if len(top) > k else slice(None)
                kept[q] = (top_ids[cut], top[cut])
    return [[{int(i) + 1 for i in ids} for ids, _ in kept] for kept in best]


def search_cases(n: int, root: str = "/archive/data") -> list[tuple[str, Any, np.ndarray | None]]:
    """(label, SearchFilters, mask of the archive's rows it keeps) of the benchmark's four searches."""
    from indexer.filters import SearchFilters

    positions = np.arange(n, dtype=np.int64)
    modality = positions % 10 == 0  # MODALITIES[0]: 10%
    in_folder = positions % FOLDERS == 7  # f007: 1%
    day0 = dt.date(2015, 1, 1)
    days = (positions * 7919) % 3650
    since, until = dt.date(2019, 1, 1), dt.date(2019, 12, 31)
    in_dates = (days >= (since - day0).days) & (days <= (until - day0).days)
    return [("unfiltered", None, None),
            ("10% modality", SearchFilters.make(modality=MODALITIES[0]), modality),
            ("1% folder", SearchFilters(under=f"{root}/f007"), in_folder),
            (f"{in_dates.mean():.0%} date range", SearchFilters.make(since=since, until=until), in_dates)]


def truth_of(archive: Archive, masks: list, queries: np.ndarray, k: int) -> list[list[set[int]]]:
    """`brute`, kept in the temporary folder for the next run over the same archive and queries (a
    pass over 10M vectors made again takes minutes)."""
    import hashlib
    import pickle

    key = hashlib.sha256(repr((archive.n, archive.seed, k, len(masks))).encode() + queries.tobytes()).hexdigest()[:16]
    kept = Path(tempfile.gettempdir()) / f"bench_scale_truth_{key}.pickle"
    if kept.exists():
        return pickle.loads(kept.read_bytes())
    truths = brute(archive, masks, queries, k)
    kept.write_bytes(pickle.dumps(truths))
    return truths


def served_latencies(folder: Path, likes: np.ndarray, truths: list, cases: list, k: int = 10) -> None:
    """The same searches through a real mi-serve (benchmarks/bench_web.served) over the index: GET
    /api/search?like=ID ("more like this" of an indexed image: its stored vector, no model loaded), each
    case's filters as query parameters; latency as the client sees it, recall@10 against brute force."""
    import http.client
    import json
    import urllib.parse

    from bench_web import TINY, served

    with served(folder, str(TINY)) as url:
        # one kept-alive connection, as a browser holds one: a new TCP connection per request (urllib)
        # added its own 1-2 ms to every figure
        connection = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=600)
        for (label, filters, mask), truth in zip(cases, truths):
            params = {"k": k, "duplicates": "true"}
            for name in ("modality", "under", "since", "until"):
                value = getattr(filters, name, None) if filters else None
                if value is not None:
                    params[name] = str(value)
            times, found = [], []
            for number, like in enumerate([likes[0], *likes]):  # the first: warm-up (FAISS loaded, filter fetched)
                start = time.perf_counter()
                connection.request("GET", "/api/search?" + urllib.parse.urlencode({**params, "like": int(like)}))
                response = connection.getresponse()
                hits = json.loads(response.read())
                if response.status != 200:
                    raise SystemExit(f"mi-serve answered {response.status}: {hits}")
                if number:
                    times.append((time.perf_counter() - start) * 1000)
                    found.append({hit["id"] for hit in hits})
            recall = np.mean([len(f & t) / k for f, t in zip(found, truth)])
            print(f"{'mi-serve ' + label:>25}: p50 {np.percentile(times, 50):6.1f} ms  "
                  f"p95 {np.percentile(times, 95):6.1f} ms  recall@10 {recall:.3f}  {load()}", flush=True)
        print(f"mi-serve's memory after them: {children_memory()}", flush=True)


def children_memory() -> str:
    """Peak and current resident memory of this process's child processes (the server)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
        except OSError:
            continue
        if int(status["PPid"]) == os.getpid() and "VmHWM" in status:
            gb = {key: int(status[key].split()[0]) / 1e6 for key in ("VmHWM", "VmRSS", "RssAnon")}
            found.append(f"pid {pid}: peak RSS {gb['VmHWM']:.2f} GB (now {gb['VmRSS']:.2f}, "
                         f"anonymous {gb['RssAnon']:.2f})")
    return "; ".join(found) or "no child process"


def timed(searcher, queries, filters, k=10):
    from retrieval.request import SearchRequest

    request = SearchRequest.make((), filters=filters, k=k, duplicates=True)
    searcher.answer(request, queries[0])  # warm-up (the FAISS file loaded once)
    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        hits = searcher.answer(request, q)
        times.append((time.perf_counter() - start) * 1000)
        found.append({h.id for h in hits})
    return np.array(times), found


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the folder walk's child)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def bench_walk(n: int) -> None:
    """The planning of an unchanged re-run over n files on disk (walk, lookup, compare)."""
    from indexer.run.pipeline import Summary
    from indexer.run.plan import plan
    from indexer.sources import FolderSource
    from indexer.store import IndexStore

    with tempfile.TemporaryDirectory(prefix="bench_walk_") as tmp:
        data = Path(tmp, "data")
        for i in range(n):
            sub = data / f"s{i % 100:02d}" / f"t{i % 1000 // 100}"
            if i < 1000:
                sub.mkdir(parents=True, exist_ok=True)
            (sub / f"img{i:07d}.dcm").write_bytes(b"")
        store = IndexStore.open(Path(tmp, "index"), create=True)
        source = FolderSource([data])
        listed = list(source.items())
        store.commit(skipped=[{"path": item.key, "size": item.size, "mtime_ns": item.mtime_ns,
                               "content_hash": None, "error": "not an image"} for item in listed])
        walls = []
        for _ in range(3):  # the median of three, with the CPU time: on a shared machine the wall time is the load's
            start, cpu = time.perf_counter(), cpu_seconds()
            todo, removed = plan(FolderSource([data]), store, Summary(index=tmp))
            walls.append(time.perf_counter() - start)
            print(f"unchanged re-run over {n:,} files: planning {walls[-1]:.2f} s "
                  f"(CPU {cpu_seconds() - cpu:.2f} s, the walking child's included; {len(todo)} to do, "
                  f"{len(removed)} removed)  {load()}",
                  flush=True)
        print(f"median {sorted(walls)[1]:.2f} s", flush=True)
        store.close()


def bench_series(series: int, slices: int = 200, samples: tuple[int, ...] = (3, 10, 30)) -> None:
    """How well a series vector finds its own series' slices, from all slices or a few sampled:
    for each series, the share of its own slices among the `slices` nearest its vector. Synthetic
    series (a direction per series, slices spread around it, neighbouring series close), so this
    measures the mechanics and what sampling costs, not what a real encoder's series look like."""
    from indexer.store.series import series_vector

    rng = np.random.default_rng(5)
    centres = clustered_unit(series, DIM, seed=1, clusters=max(2, series // 10))[0]
    noise = rng.standard_normal((series, slices, DIM)).astype(np.float32) * 0.1
    vectors = centres[:, None, :] + noise
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    flat = vectors.reshape(-1, DIM)
    owner = np.repeat(np.arange(series), slices)
    for sample in (None, *samples):
        start = time.perf_counter()
        means = np.stack([series_vector(v if sample is None else v[rng.choice(slices, sample, replace=False)])
                          for v in vectors])
        took = time.perf_counter() - start
        own = [np.mean(owner[np.argpartition(-(flat @ means[s]), slices)[:slices]] == s) for s in range(series)]
        print(f"series vector from {'all ' + str(slices) if sample is None else sample:>7} slices: own slices "
              f"among its {slices} nearest {np.mean(own):.3f} (min {np.min(own):.3f}); {took * 1e3 / series:.2f} ms "
              f"per series", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--keep", help="index folder to build into (or reuse, when it holds --images)")
    parser.add_argument("--search-only", action="store_true",
                        help="only the searches (leaves a --keep index as it is, for the next run)")
    parser.add_argument("--server", action="store_true", help="also time the searches through a real mi-serve")
    parser.add_argument("--rebuild", action="store_true",
                        help="also time a FAISS rebuild from the stored vectors in a fresh process")
    parser.add_argument("--gc-torch", action="store_true", help="import torch first, as the server does")
    parser.add_argument("--walk-files", type=int, help="only time the planning of an unchanged re-run over so many files")
    parser.add_argument("--series", type=int, help="only measure series vectors over so many synthetic series")
    args = parser.parse_args()
    if args.series:
        bench_series(args.series)
        return
    if args.walk_files:
        bench_walk(args.walk_files)
        return
    if args.gc_torch:
        import torch  # noqa: F401

    from indexer.store import IndexStore
    from retrieval.search import Searcher

    n = args.images
    print(f"N={n:,}  {load()}  cpus={os.cpu_count()}", flush=True)
    archive = Archive(n, seed=0)
    queries = archive.near_queries(args.queries, 0.8, seed=3)
    likes = np.random.default_rng(4).choice(n, size=args.queries, replace=False) + 1  # image ids, for mi-serve
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench_scale_"))
    root = "/archive/data"
    store = IndexStore.open(folder, create=True)
    built = store.count() != n
    if built:
        store.close()
        for f in folder.iterdir():
            f.unlink()
        store = IndexStore.open(folder, create=True)
        print(f"build through the store: {build(store, archive, root):.1f} s, {memory_peak_gb()}  {load()}",
              flush=True)
    store.close()
    storage(folder, n, rebuild=args.rebuild or (not built and not args.search_only))

    cases = search_cases(n, root)
    start = time.perf_counter()
    truths = truth_of(archive, [mask for _, _, mask in cases],
                      np.vstack([queries, archive.rows(likes - 1)]) if args.server else queries, 10)
    print(f"brute-force truth: {time.perf_counter() - start:.0f} s", flush=True)
    with Searcher(folder, model=None) as searcher:
        for (label, filters, mask), truth in zip(cases, truths):
            times, found = timed(searcher, queries, filters)
            recall = np.mean([len(f & t) / 10 for f, t in zip(found, truth)])
            print(f"{label:>16}: p50 {np.percentile(times, 50):6.1f} ms  p95 {np.percentile(times, 95):6.1f} ms"
                  f"  recall@10 {recall:.3f}  {load()}", flush=True)
        print(f"after the searches: {memory_peak_gb()}", flush=True)
        if args.server:
            served_latencies(folder, likes, [truth[len(queries):] for truth in truths], cases)
        if args.search_only:
            return

        store = IndexStore.open(folder)
        store.lock()
        extra = clustered_unit(max(1, n // 100) + 1, DIM, seed=9, clusters=100)[0]
        start = time.perf_counter()
        build_items = rows(n, extra[:-1], "/archive/new")
        store.commit(indexed=build_items)
        store.write_faiss()
        print(f"add 1% ({len(extra) - 1:,}): {time.perf_counter() - start:.2f} s (commit + write_faiss)", flush=True)
        start = time.perf_counter()
        store.commit(indexed=rows(n + len(extra) - 1, extra[-1:], "/archive/one"))
        store.write_faiss()
        added = time.perf_counter() - start
        hits = searcher.search(vector=extra[-1], k=1, duplicates=True)
        seen = time.perf_counter() - start
        print(f"add one image: {added:.2f} s; seen by the running Searcher after {seen:.2f} s "
              f"(top hit is it: {hits[0].path.startswith('/archive/one')})", flush=True)
        times, _ = timed(searcher, queries[:10], None)
        print(f"unfiltered after the adds: p50 {np.percentile(times, 50):.1f} ms", flush=True)
        start = time.perf_counter()
        removed = store.remove_roots([f"{root}/f{j:03d}" for j in range(10)])  # as `mi-index --remove` does
        middle = time.perf_counter()
        store.write_faiss()
        print(f"--remove 10% ({removed:,} files): {time.perf_counter() - start:.2f} s (SQLite {middle - start:.2f} s"
              f", FAISS {time.perf_counter() - middle:.2f} s)", flush=True)
        store.close()
        hits = searcher.search(vector=archive.rows([0])[0], k=10, duplicates=True)
        print(f"running Searcher after it: {sum(h.path.startswith(f'{root}/f000/') for h in hits)} removed rows in "
              f"the top 10 (0 expected)", flush=True)
    start = time.perf_counter()
    with Searcher(folder, model=None) as fresh:
        fresh.search(vector=archive.rows([0])[0], k=10, duplicates=True)
        print(f"a fresh Searcher's first query after it (the FAISS file read, removals applied): "
              f"{time.perf_counter() - start:.2f} s", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:,.0f} MB  {load()}", flush=True)


if __name__ == "__main__":
    main()
