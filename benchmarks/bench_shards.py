"""Sharding measured on one machine (issue 20): S index folders by id range, a query fanned out, merged by score.

N synthetic images split by id range into S index folders; a query goes to every shard's Searcher with the
same filter, and the S top-k lists are merged by their exact scores.

For each S (default 1, 2, 4, 8; default N = 200k): shard j holds images j*N/S .. (j+1)*N/S - 1, built
through the store as bench_scale.py builds one index (1024-d clustered vectors, 10 modalities). The
fan-out runs sequentially and in a pool of S threads (FAISS releases the GIL), unfiltered and with a
10% modality filter; printed: p50 / p95 per query (fan-out + merge), the slowest shard's own time
(sequential run), recall@10 against brute force over all N, and how many queries' merged top 10 equal
S=1's (the single index) and the brute-force top 10. `--ray` adds the same fan-out to one Ray actor per
shard on a local cluster: the actor round trip's added cost. The FAISS kind of a shard follows its
size (flat to 50k, IVF fp16 above), so S changes the per-shard search too; `--ivf-shards` makes every
shard IVF fp16 (a rerun without it turns them back).

    python benchmarks/bench_shards.py --keep /tmp/shards          # a rerun reuses the shards
    python benchmarks/bench_shards.py --images 400000 --shards 1 4 --ray

Numbers on a shared machine: the load average is printed next to them."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import MODALITIES, build  # noqa: E402
from bench_search import DIM, clustered_unit, load, near_queries  # noqa: E402

K = 10


def bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """[lo, hi) of each shard's global image positions."""
    return [(j * n // shards, (j + 1) * n // shards) for j in range(shards)]


def global_position(path: str, lo: int) -> int:
    """bench_scale's rows() names image i of a shard .../img{i:08d}.dcm; the shard starts at lo."""
    return lo + int(path[-12:-4])


def open_shards(keep: Path, data: np.ndarray, shards: int, ivf: bool) -> list[Path]:
    """Build (or reuse, when it holds its images) each shard's index folder under keep. `ivf`: a FAISS
    memory budget (the store's, as `mi-index --faiss-memory` sets it) that IVF fp16 fits and flat does not."""
    from indexer.store import IndexStore

    folders = []
    for j, (lo, hi) in enumerate(bounds(len(data), shards)):
        folder = keep / f"n{len(data)}-s{shards}-{j}"
        folder.mkdir(parents=True, exist_ok=True)
        store = IndexStore.open(folder, create=True)
        if store.count() != hi - lo:
            store.close()
            for f in folder.iterdir():
                f.unlink()
            store = IndexStore.open(folder, create=True)
            took = build(store, data[lo:hi], f"/archive/shard{j}")
            print(f"  built shard {j + 1}/{shards} ({hi - lo:,} images): {took:.1f} s  {load()}", flush=True)
        start = time.perf_counter()
        store.set_faiss_memory((hi - lo) * 3000 / 1e9 if ivf else None)  # IVF: 2,056 B a vector, flat 4,104
        store.write_faiss()  # rebuilt when the budget changed, else kept
        if time.perf_counter() - start > 0.5:
            print(f"  shard {j + 1}/{shards}'s FAISS index rebuilt for the budget: {time.perf_counter() - start:.1f} s",
                  flush=True)
        store.close()
        folders.append(folder)
    return folders


def modality_mask(n: int, shards: int) -> np.ndarray:
    """Which global positions the modality filter allows: rows() gives a shard's i-th image
    MODALITIES[i % 10], so with N a multiple of 10*S this is every tenth image for every S."""
    mask = np.zeros(n, dtype=bool)
    for lo, hi in bounds(n, shards):
        mask[lo:hi] = np.arange(hi - lo) % 10 == 0
    return mask


def truth(data: np.ndarray, mask: np.ndarray | None, queries: np.ndarray) -> list[list[int]]:
    """The exact top K global positions per query, best first, among those `mask` allows."""
    out = [[] for _ in queries]
    for first in range(0, len(queries), 25):  # (N, 25) float32 scores at a time
        scores = data @ queries[first:first + 25].T
        if mask is not None:
            scores[~mask] = -np.inf
        for c in range(scores.shape[1]):
            top = np.argpartition(-scores[:, c], K)[:K]
            out[first + c] = [int(i) for i in top[np.argsort(-scores[top, c])]]
    return out


def merge(lists: list[list[tuple[float, int]]]) -> list[tuple[float, int]]:
    """The router's merge: every shard's scores are exact, so the best K of their union are the best K."""
    return sorted((pair for hits in lists for pair in hits), key=lambda pair: -pair[0])[:K]


class Shard:
    """One shard's Searcher, answering (score, global position) pairs."""

    def __init__(self, folder: Path, lo: int) -> None:
        from retrieval.search import Searcher

        self.searcher = Searcher(folder, model=None)
        self.lo = lo

    def top(self, request, q: np.ndarray) -> list[tuple[float, int]]:
        return [(h.score, global_position(h.path, self.lo)) for h in self.searcher.answer(request, q)]

    def ping(self, q: np.ndarray) -> int:
        """No search: what a call to the actor costs by itself."""
        return len(q)

    def close(self) -> None:
        self.searcher.close()


def sequential(shards: list[Shard], request, q: np.ndarray) -> tuple[list, float]:
    """The merged top K asking one shard after another, and the slowest shard's own ms."""
    lists, slowest = [], 0.0
    for shard in shards:
        began = time.perf_counter()
        lists.append(shard.top(request, q))
        slowest = max(slowest, time.perf_counter() - began)
    return merge(lists), slowest * 1000


def threaded(pool: ThreadPoolExecutor, shards: list[Shard], request, q: np.ndarray) -> list:
    return merge(list(pool.map(lambda shard: shard.top(request, q), shards)))


def over_ray(actors, request, q: np.ndarray) -> list:
    import ray

    ref = ray.put(q)  # one copy in the object store for all S actors
    return merge(ray.get([a.top.remote(request, ref) for a in actors]))


def ray_calls(actors, q: np.ndarray) -> list:
    """The same S calls to no-op methods: the round trip without the search."""
    import ray

    ref = ray.put(q)
    ray.get([a.ping.remote(ref) for a in actors])
    return []


def measure(ways: dict, queries: np.ndarray) -> dict:
    """{way: (ms per query, merged top K per query)}; the ways take turns query by query, so a change in
    the machine's load falls on all of them alike. Each way's first query is a warm-up, not counted."""
    out = {way: ([], []) for way in ways}
    for i, q in enumerate(np.concatenate([queries[:1], queries])):
        for way, run in ways.items():
            start = time.perf_counter()
            merged = run(q)
            took = (time.perf_counter() - start) * 1000
            if i:
                out[way][0].append(took)
                out[way][1].append(merged)
    return {way: (np.array(times), merged) for way, (times, merged) in out.items()}


def start_ray(shards: int):
    import ray

    if not ray.is_initialized():
        # Workers import this checkout's packages, not an installed copy's.
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), object_store_memory=200 * 2 ** 20, include_dashboard=False,
                 log_to_driver=False)
        print(f"  ray.init (local cluster): {time.perf_counter() - start:.1f} s", flush=True)
    # num_cpus=0: S actors on 2 cores, as S Searchers share them in the thread pool
    return ray.remote(num_cpus=0)(Shard)


def pct(times: np.ndarray) -> str:
    return f"{np.percentile(times, 50):6.1f} {np.percentile(times, 95):6.1f}"


def matches(merged: list[list[tuple[float, int]]], expected: list[list[int]]) -> int:
    """Queries whose merged top K holds the same images as `expected` (ties may order them differently)."""
    return sum({p for _, p in m} == set(e) for m, e in zip(merged, expected))


def exact_single(merged, single, expected) -> str:
    """Of the queries where the single index found the exact top K, how many the merge found too."""
    exact = [(m, [p for _, p in s]) for m, s, e in zip(merged, single, expected) if {p for _, p in s} == set(e)]
    return f"{matches([m for m, _ in exact], [s for _, s in exact])}/{len(exact)}"


def recall(merged, expected) -> float:
    return float(np.mean([len({p for _, p in m} & set(e)) / K for m, e in zip(merged, expected)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200_000, help="N, all shards together (default 200,000)")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8], help="the S to measure (1 2 4 8)")
    parser.add_argument("--queries", type=int, default=50, help="queries per case (default 50)")
    parser.add_argument("--keep", help="folder for the shards' index folders (reused when they hold their images)")
    parser.add_argument("--ivf-shards", action="store_true",
                        help="every shard's FAISS index IVF fp16 (default: flat up to 50k vectors, as mi-index)")
    parser.add_argument("--ray", action="store_true", help="also fan out to one Ray actor per shard (local cluster)")
    args = parser.parse_args()

    from indexer.filters import SearchFilters
    from indexer.store.vectors import choose_kind
    from retrieval.request import SearchRequest

    n = args.images
    print(f"N={n:,}  shards {args.shards}  queries {args.queries}  {load()}  cpus={os.cpu_count()}", flush=True)
    data, _ = clustered_unit(n, DIM, seed=0, clusters=max(100, n // 100))
    queries = near_queries(data, args.queries, 0.8, seed=3)
    keep = Path(args.keep or tempfile.mkdtemp(prefix="bench_shards_"))
    cases = {"unfiltered": SearchRequest.make((), filters=None, k=K, duplicates=True),
             "10% modality": SearchRequest.make((), filters=SearchFilters.make(modality=MODALITIES[0]), k=K,
                                                duplicates=True)}
    exact = {"unfiltered": truth(data, None, queries)}
    single: dict[str, list] = {}  # S=1's merged top K per case
    table = []
    for s in args.shards:
        kind = choose_kind(n // s, DIM, n // s * 3000 if args.ivf_shards else None)
        print(f"S={s}: {n // s:,} images a shard ({kind})  {load()}", flush=True)
        folders = open_shards(keep, data, s, args.ivf_shards)
        mask = modality_mask(n, s)
        exact["10% modality"] = truth(data, mask, queries)
        shards = [Shard(folder, lo) for folder, (lo, _) in zip(folders, bounds(n, s))]
        actors = []
        if args.ray:
            remote = start_ray(s)
            started = time.perf_counter()
            actors = [remote.remote(folder, lo) for folder, (lo, _) in zip(folders, bounds(n, s))]
            print(f"  {s} actors started: {time.perf_counter() - started:.1f} s", flush=True)
        with ThreadPoolExecutor(max_workers=s) as pool:
            for label, request in cases.items():
                slowest: list[float] = []

                def seq(q, request=request):
                    merged, slow = sequential(shards, request, q)
                    slowest.append(slow)
                    return merged

                ways = {"seq": seq, "threads": lambda q, request=request: threaded(pool, shards, request, q)}
                if actors:
                    ways["ray"] = lambda q, request=request: over_ray(actors, request, q)
                    ways["ray no-op"] = lambda q: ray_calls(actors, q)
                got = measure(ways, queries)
                merged = got["seq"][1]
                single.setdefault(label, merged)  # the first S measured (1 by default) is the reference
                row = {"S": s, "case": label, "seq": pct(got["seq"][0]), "threads": pct(got["threads"][0]),
                       "slowest": pct(np.array(slowest[1:])), "recall": recall(merged, exact[label]),
                       "brute": matches(merged, exact[label]),
                       "single": matches(merged, [[p for _, p in m] for m in single[label]]),
                       "single_exact": exact_single(merged, single[label], exact[label]),
                       "same": min(sum(a == b for a, b in zip(merged, got[way][1])) for way in ("threads", "ray")
                                   if way in got),
                       "ray": "", "ray_cost": ""}
                if actors:
                    row["ray"] = pct(got["ray"][0])
                    row["ray_cost"] = f"{np.percentile(got['ray'][0], 50) - np.percentile(got['threads'][0], 50):+6.1f}"
                    row["ray_noop"] = pct(got["ray no-op"][0])
                table.append(row)
                print(f"  {label}: sequential {row['seq']} ms, threads {row['threads']} ms, slowest shard "
                      f"{row['slowest']} ms" + (f", ray {row['ray']} ms" if actors else "")
                      + f"; recall@10 {row['recall']:.3f}  {load()}", flush=True)
        for shard in shards:
            shard.close()
        if actors:
            import ray

            for actor in actors:
                ray.kill(actor)

    q = args.queries
    print(f"\nN={n:,}, {q} queries, k={K}; ms p50 p95; 'slowest' = the slowest shard's own query in the sequential run;"
          f"\n'=S1' / '=brute': queries whose merged top 10 equals the single index's / brute force's;"
          f"\n'=S1 exact': the same, among the queries where the single index found the exact top 10;"
          f"\n'same' = queries where sequential, threads{' and Ray' if args.ray else ''} merged the same top 10")
    header = (f"{'S':>2} {'case':>12} | {'sequential':>13} | {'threads':>13} | {'slowest':>13} | recall | "
              f"{'=S1':>5} | {'=S1 exact':>9} | {'=brute':>6} | {'same':>5}"
              + (f" | {'ray':>13} | ray-thr p50 | {'ray no-op':>13}" if args.ray else ""))
    print(header)
    print("-" * len(header))
    for r in table:
        print(f"{r['S']:>2} {r['case']:>12} | {r['seq']:>13} | {r['threads']:>13} | {r['slowest']:>13} | "
              f"{r['recall']:.3f}  | {r['single']:>2}/{q:<2} | {r['single_exact']:>9} | {r['brute']:>3}/{q:<2} | "
              f"{r['same']:>2}/{q:<2}" + (f" | {r['ray']:>13} | {r['ray_cost']:>11} | {r['ray_noop']:>13}"
                                          if args.ray else ""))
    print(f"{load()}", flush=True)
    if args.ray:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main()
