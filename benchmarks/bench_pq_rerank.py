"""Would 8-bit PQ codes kept in memory rank an IVF-PQ search's candidates well enough to read exact
vectors for only the best few? Over an index `bench_scale.py --images N --keep DIR` built (IVF-PQ
fast scan, N >= 2M): trains `faiss.ProductQuantizer(D, D/4, 8)` (4-d subvectors, 8 bits) on 100k
stored vectors, then for the benchmark's searches ("near" queries and "more like this" of indexed
images) ranks the candidates the index proposes by the codes and prints recall@10 against brute
force when exact scores are read for the best 10, 20, 30 or 50 of them, beside all of them (today's
re-ranking). Cold, each exact read is a random 2 KB read of the vector file: fewer reads is the gain.

    python benchmarks/bench_pq_rerank.py --images 10000000 --keep /tmp/idx10m
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import Archive, search_cases, truth_of  # noqa: E402

BEST = (10, 20, 30, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--keep", type=Path, required=True, help="the index bench_scale.py built")
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()

    import faiss

    from retrieval.request import SearchRequest
    from retrieval.search import Searcher

    archive = Archive(args.images, seed=0)
    queries = archive.near_queries(args.queries, 0.8, seed=3)
    likes = np.random.default_rng(4).choice(args.images, size=args.queries, replace=False) + 1
    cases = [case for case in search_cases(args.images) if case[0] != "1% folder"]  # that one is an exact scan
    start = time.perf_counter()
    truths = truth_of(archive, [mask for _, _, mask in cases], np.vstack([queries, archive.rows(likes - 1)]), 10)
    print(f"brute-force truth: {time.perf_counter() - start:.0f} s", flush=True)
    with Searcher(args.keep, model=None) as searcher:
        start = time.perf_counter()
        sample = searcher._store.vectors(list(range(1, 100_001))).astype(np.float32)
        quantizer = faiss.ProductQuantizer(sample.shape[1], sample.shape[1] // 4, 8)
        quantizer.train(sample)
        print(f"PQ {sample.shape[1] // 4}x8 trained on 100k stored vectors in {time.perf_counter() - start:.0f} s",
              flush=True)
        like_vectors = searcher._store.vectors([int(i) for i in likes])
        proposed = {}
        read = searcher._stored_vectors

        def kept(ids):  # the candidates the index proposed, and their stored vectors
            vectors = read(ids)
            proposed["ids"], proposed["vectors"] = np.asarray(ids), vectors.astype(np.float32)
            return vectors
        searcher._stored_vectors = kept
        for (label, filters, _), truth in zip(cases, truths):
            asked = SearchRequest.make((), filters=filters, k=10, duplicates=True)
            for name, vectors, wanted in (("near", queries, truth[:len(queries)]),
                                          ("like", like_vectors, truth[len(queries):])):
                recall: dict = {"all": [], **{best: [] for best in BEST}}
                for query, expected in zip(vectors, wanted):
                    searcher.answer(asked, query)
                    ids, stored = proposed["ids"], proposed["vectors"]
                    exact = stored @ query
                    recall["all"].append(len(set(ids[np.argsort(-exact)[:10]]) & expected) / 10)
                    order = np.argsort(-(quantizer.decode(quantizer.compute_codes(stored)) @ query))
                    for best in BEST:
                        chosen = order[:best][np.argsort(-exact[order[:best]])[:10]]
                        recall[best].append(len(set(ids[chosen]) & expected) / 10)
                print(f"{label:>14} {name}: {len(ids)} candidates; recall@10 with exact scores for all of them "
                      f"{np.mean(recall['all']):.3f}, for the best " +
                      ", ".join(f"{best} {np.mean(recall[best]):.3f}" for best in BEST), flush=True)


if __name__ == "__main__":
    main()
