"""indexer.store.vectors: exact and IVF indexes, filtered top-k that applies the filter before the cut."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.store import vectors


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """3000 unit vectors in 40 clusters (like embeddings), ids 101, 104, 107, ... (not 0..N-1)."""
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((40, 32)))
    data = unit(centres[rng.integers(0, 40, 3000)] + 0.5 * unit(rng.standard_normal((3000, 32))))
    return data, 101 + 3 * np.arange(3000, dtype=np.int64)


def exact_top(data, ids, query, k, allowed=None):
    scores = data @ query
    if allowed is not None:
        scores = np.where(np.isin(ids, allowed), scores, -np.inf)
    order = np.argsort(-scores)[:k]
    return ids[order[np.isfinite(scores[order])]]


def test_flat_equals_brute_force(clustered):
    data, ids = clustered
    index = vectors.build_faiss_index(data, ids)
    assert vectors.index_kind(index) == "flat"
    scores, found = vectors.search(index, data[:5], 7)
    for row in range(5):
        assert list(found[row]) == list(exact_top(data, ids, data[row], 7))
        assert scores[row, 0] == pytest.approx(1.0, abs=1e-5)  # itself
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("fraction", [0.3, 0.01])
def test_filter_applies_before_the_cut(clustered, kind, fraction):
    data, ids = clustered
    index = vectors.build_faiss_index(data, ids, kind=kind, nlist=64)
    rng = np.random.default_rng(1)
    allowed = rng.choice(ids, size=int(len(ids) * fraction), replace=False)
    queries = data[rng.choice(len(data), 10, replace=False)]
    _, found = vectors.search(index, queries, 10, allowed_ids=allowed)
    assert np.isin(found, allowed).all()  # only allowed rows, and k of them (>= k exist)
    matches = [len(set(f) & set(exact_top(data, ids, q, 10, allowed))) / 10 for f, q in zip(found, queries)]
    # flat is exact; for IVF a selective filter widens nprobe to every list, which is exact too
    assert np.mean(matches) >= (1.0 if kind == "flat" or fraction == 0.01 else 0.9)


def test_fewer_allowed_than_k_and_no_allowed(clustered):
    data, ids = clustered
    index = vectors.build_faiss_index(data, ids)
    scores, found = vectors.search(index, data[:1], 5, allowed_ids=ids[[3, 9]])
    assert found.shape == scores.shape == (1, 2)  # no more columns than rows that can answer
    assert sorted(found[0]) == sorted(ids[[3, 9]]) and np.isfinite(scores).all()
    _, found = vectors.search(index, data[:1], 5, allowed_ids=np.array([], dtype=np.int64))
    assert (found == -1).all()
    _, found = vectors.search(index, data[:1], 10**12)  # an absurd k costs nothing
    assert found.shape == (1, len(ids)) and (found >= 0).all()


def test_huge_ids_use_a_batch_selector(clustered):
    data, ids = clustered
    big = ids + (1 << 40)  # beyond the bitmap selector's range
    index = vectors.build_faiss_index(data, big)
    _, found = vectors.search(index, data[:3], 4, allowed_ids=big[::2])
    assert np.isin(found, big[::2]).all() and (found >= 0).all()


def test_ivf_recall_and_exactness_with_all_lists(clustered):
    data, ids = clustered
    ivf = vectors.build_faiss_index(data, ids, kind="ivf", nlist=64)
    assert vectors.index_kind(ivf) == "ivf"
    queries = unit(data[:50] + 0.3 * unit(np.random.default_rng(2).standard_normal((50, 32))))
    truth = [exact_top(data, ids, q, 10) for q in queries]
    _, every_list = vectors.search(ivf, queries, 10, nprobe=64)
    for found, query in zip(every_list, queries):  # exact up to fp16 storage: compare true scores
        true_scores = data[np.searchsorted(ids, found)] @ query
        best_scores = data[np.searchsorted(ids, exact_top(data, ids, query, 10))] @ query
        np.testing.assert_allclose(np.sort(true_scores), np.sort(best_scores), atol=2e-3)
    _, default = vectors.search(ivf, queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(default, truth)])
    assert recall >= 0.9


def test_auto_switches_to_ivf_above_the_threshold_and_to_pq_beyond_the_budget(clustered, monkeypatch):
    data, ids = clustered
    monkeypatch.setattr(vectors, "FLAT_MAX_VECTORS", len(data) - 1)
    index = vectors.build_faiss_index(data, ids)
    assert vectors.index_kind(index) == "ivf" and index.ntotal == len(data)
    monkeypatch.setattr(vectors, "DEFAULT_MEMORY_BUDGET", len(data) * (data.shape[1] + 8))  # fp16 no longer fits
    index = vectors.build_faiss_index(data, ids)
    assert vectors.index_kind(index) == "ivfpq" and faiss.downcast_index(index).pq.M == data.shape[1] // 4


def test_ivf_survives_serialisation(clustered):
    """The store keeps the index as a file: a written and read IVF index searches the same."""
    data, ids = clustered
    ivf = vectors.build_faiss_index(data, ids, kind="ivf", nlist=64)
    copy = faiss.deserialize_index(faiss.serialize_index(ivf))
    allowed = ids[::7]
    for index in (ivf, copy):
        _, found = vectors.search(index, data[:3], 5, allowed_ids=allowed)
        assert np.isin(found, allowed).all()
    assert np.array_equal(vectors.search(ivf, data[:3], 5)[1], vectors.search(copy, data[:3], 5)[1])


def test_empty_index_and_bad_input():
    index = vectors.build_faiss_index(np.zeros((0, 8), np.float32), np.zeros(0, np.int64))
    assert index.ntotal == 0
    assert (vectors.search(index, np.ones((1, 8), np.float32), 3)[1] == -1).all()
    with pytest.raises(ValueError):
        vectors.build_faiss_index(np.zeros((3, 8), np.float32), np.arange(2))
    with pytest.raises(ValueError, match="kind"):
        vectors.build_faiss_index(np.zeros((3, 8), np.float32), np.arange(3), kind="hnsw")


def test_ivf_lists_grow_with_size():
    assert vectors.ivf_lists(10_000) < vectors.ivf_lists(1_000_000) <= 16384


def test_a_memory_budget_chooses_flat_then_fp16_then_pq():
    dim = 1024
    assert vectors.choose_kind(10_000, dim) == "flat" and vectors.choose_kind(10**6, dim) == "ivf"
    assert vectors.choose_kind(10**7, dim) == "ivfpq"                               # fp16: 20 GB
    assert vectors.choose_kind(10_000, dim, memory_budget=10**9) == "flat"          # 41 MB fits
    assert vectors.choose_kind(10_000, dim, memory_budget=30 * 10**6) == "ivf"      # 20.6 MB fp16 fits
    assert vectors.choose_kind(10**7, dim, memory_budget=10**9) == "ivfpq"          # fp16 would be 20 GB
    assert vectors.pq_bytes(10**7, dim, 10**9) == 64 and vectors.pq_bytes(10**7, dim, 3 * 10**8) == 16
    assert vectors.pq_bytes(10**7, dim, 4 * 10**9) == 128                          # 4-bit codes, D/4 of them
    with pytest.raises(ValueError, match="at least 0.100 GB"):
        vectors.pq_bytes(10**7, dim, 9 * 10**7)


def test_an_ivfpq_index_fits_its_budget_and_finds_each_vector_after_reranking(tmp_path):
    data = unit(np.random.default_rng(5).standard_normal((3000, 64)).astype(np.float32))
    budget = 3000 * (16 + 8)
    index = vectors.build_faiss_index(data, np.arange(3000) + 100, memory_budget=budget)
    assert vectors.index_kind(index) == "ivfpq"
    faiss.write_index(index, str(tmp_path / "pq.faiss"))
    assert (tmp_path / "pq.faiss").stat().st_size < 2 * budget < data.nbytes / 4
    scores, ids = vectors.search(index, data[:50], 10 * vectors.RERANK_FACTOR)
    found = [row - 100 for row in ids]
    # ranked by exact scores (as the Searcher does), every vector finds itself first
    firsts = [int(rows[np.argmax(data[rows[rows >= 0]] @ q)]) for rows, q in zip(found, data[:50])]
    assert firsts == list(range(50))


def test_mi_index_faiss_memory_builds_pq_and_searches_exactly(tmp_path, monkeypatch):
    from PIL import Image

    import indexer
    from retrieval import Searcher
    from retrieval.live_index import LiveIndex

    FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(2)
    # 100 images: over 64 (below that a budget skips IVF fp16 anyway), 3 lists of 32 training
    # points each, 4-bit codes; each one an encoder call
    for i in range(100):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    index_dir = tmp_path / "index"
    indexer.index_paths([folder], index_dir, model=str(FIXTURE), workers=0, faiss_memory=100 * 30 / 1e9)
    with Searcher(index_dir, model=str(FIXTURE)) as searcher:
        assert vectors.index_kind(searcher._store.load_faiss_with_generation()[0]) == "ivfpq"
        fetched = []
        real_search = LiveIndex.search
        monkeypatch.setattr(LiveIndex, "search", lambda live, queries, k, allowed, factor:
                            fetched.append(factor) or real_search(live, queries, k, allowed, factor))
        pq_hits = searcher.search(image=folder / "007.png", k=5)
        assert pq_hits[0].path.endswith("007.png") and pq_hits[0].score == pytest.approx(1.0, abs=1e-5)
        under = searcher.search(image=folder / "007.png", k=5, under=str(folder.resolve()))
        assert [h.id for h in under] == [h.id for h in pq_hits]  # every image is under it
        # a filter's top k lie where the codes' scores crowd: more candidates re-ranked (recall at 10M)
        assert fetched == [vectors.RERANK_FACTOR, vectors.FILTERED_RERANK_FACTOR]
        monkeypatch.undo()
    indexer.index_paths([folder], index_dir, model=str(FIXTURE), workers=0, faiss_memory=0)  # no budget: exact
    with Searcher(index_dir, model=str(FIXTURE)) as searcher:
        assert vectors.index_kind(searcher._store.load_faiss_with_generation()[0]) == "flat"
        exact = searcher.search(image=folder / "007.png", k=5)
    assert [h.id for h in exact][:1] == [h.id for h in pq_hits][:1]
    assert all(abs(a.score - b.score) < 1e-6 for a, b in zip(exact, pq_hits) if a.id == b.id)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_a_filtered_search_never_returns_a_row_outside_the_filter(clustered, kind):
    """Whichever index answers: the CPU index, or its GPU copy when FAISS has GPU support and a
    GPU is present (classic GPU kernels ignore an IDSelector: search() must not hand them one)."""
    data, ids = clustered
    index = vectors.build_faiss_index(data, ids, kind=kind, nlist=64)
    gpu = vectors.to_gpu(index)
    rng = np.random.default_rng(9)
    for fraction in (0.01, 0.1, 0.5):
        allowed = np.sort(rng.choice(ids, size=int(len(ids) * fraction), replace=False))
        for copy in (None, gpu):
            _, found = vectors.search(index, data[:20], 25, allowed, gpu=copy)
            returned = found[found >= 0]
            assert len(returned) and np.isin(returned, allowed).all(), (kind, fraction)


def test_an_unfiltered_search_scans_more_lists_as_the_lists_grow():
    rng = np.random.default_rng(7)
    data = rng.standard_normal((33_000, 16)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    for nlist, expected in ((256, vectors.DEFAULT_NPROBE), (1024, 96)):
        index = vectors.build_faiss_index(data, np.arange(len(data)), kind="ivf", nlist=nlist)
        faiss.cvar.indexIVF_stats.reset()
        vectors.search(index, data[:1], 10)
        assert faiss.cvar.indexIVF_stats.nlist == expected  # lists visited by the one query


def test_a_small_filter_under_ivfpq_is_scanned_exactly_from_the_stored_vectors(clustered):
    """A filter of 1 row in 50, spread over every list: the probed lists hold far more codes than it
    has rows, so its stored vectors are scanned instead (exact: the brute-force top k)."""
    data, ids = clustered
    index = vectors.build_faiss_index(data, ids, kind="ivfpq", nlist=16)
    allowed_ids = ids[::50]
    read = []

    def stored(wanted):
        read.append(len(wanted))
        return data[(np.asarray(wanted) - 101) // 3]

    allowed = vectors.Allowed(allowed_ids, stored=stored)
    for query in data[:5]:
        scores, found = vectors.search(index, query[None], 10, allowed)
        assert list(found[0]) == list(exact_top(data, ids, query, 10, allowed_ids))
        np.testing.assert_allclose(scores[0], np.sort(data[(found[0] - 101) // 3] @ query)[::-1], atol=1e-3)
    assert sum(read) == len(allowed_ids)  # read once, kept for the next searches
    coarse = vectors.Allowed(allowed_ids)  # no stored vectors: the lists' codes, still inside the filter
    _, found = vectors.search(index, data[:5], 10, coarse)
    assert np.isin(found, allowed_ids).all()


def test_fast_scan_codes_read_and_packed_as_faiss_packs_them(clustered):
    """The fast-scan block layout read by hand agrees with FAISS's own code packer, row by row, and packing
    the codes again gives FAISS's blocks byte for byte."""
    data, ids = clustered
    built = vectors.build_faiss_index(data, ids, kind="ivfpq", nlist=16)
    index = vectors._as_ivf(built)  # a view: `built` owns it
    packer, pairs = index.get_CodePacker(), index.M2 // 2
    number = int(np.argmax([index.invlists.list_size(i) for i in range(index.nlist)]))
    size = index.invlists.list_size(number)
    assert size > 40  # more than one block
    blocks = faiss.rev_swig_ptr(index.invlists.get_codes(number), -(-size // 32) * packer.block_size).copy()
    rows = np.arange(size)
    codes = vectors._codes_at(blocks, pairs, rows)
    for row in rows.tolist():
        flat = packer.unpack_1(blocks.reshape(-1, packer.block_size), row)  # two 4-bit codes a byte, low first
        assert np.array_equal(codes[row], np.stack([flat & 15, flat >> 4], axis=1).reshape(-1)), row
    assert np.array_equal(vectors._packed_codes(codes, pairs), blocks)
    some = rows[::3]
    assert np.array_equal(vectors._codes_at(vectors._packed_codes(codes[some], pairs), pairs,
                                            np.arange(len(some))), codes[some])


@pytest.mark.parametrize("fraction", [0.3, 0.05])
def test_a_filter_under_ivfpq_gets_lists_of_its_own_that_answer_as_the_selector(clustered, monkeypatch, fraction):
    """Under fast-scan IVF-PQ a filter gets a copy of its rows' codes: the same hits and scores as the selector
    over the base index's lists, scanning only its rows."""
    data, ids = clustered
    index = vectors.build_faiss_index(data, ids, kind="ivfpq", nlist=16)
    ivf = vectors._as_ivf(index)
    allowed_ids = ids[np.random.default_rng(3).random(len(ids)) < fraction]
    queries = data[:20]
    own = vectors.Allowed(allowed_ids)
    own_scores, own_ids = vectors.search(index, queries, 10, own)
    assert index in own._own and own.own_lists(index, ivf).ntotal == len(allowed_ids)
    assert np.isin(own_ids, allowed_ids).all()
    monkeypatch.setattr(vectors, "OWN_LISTS_BYTES", 0)  # too big for lists of its own: the selector
    selector = vectors.Allowed(allowed_ids)
    sel_scores, sel_ids = vectors.search(index, queries, 10, selector)
    assert index not in selector._own
    assert np.array_equal(own_ids, sel_ids)
    np.testing.assert_allclose(own_scores, sel_scores, atol=1e-5)


def test_a_filtered_search_starts_from_more_lists_as_the_lists_grow():
    """64 lists up to 1024 (1M images), growing faster than the lists beyond (512 of 4096 at 10M): a filter's
    neighbours scatter over more of finer lists."""
    assert [vectors.filtered_nprobe(n) for n in (256, 1024, 2048, 4096)] == [vectors.DEFAULT_NPROBE, 64, 181, 512]
    assert [vectors.unfiltered_nprobe(n) for n in (256, 1024, 2048, 4096)] == [vectors.DEFAULT_NPROBE, 96, 272, 768]
    rng = np.random.default_rng(7)
    data = unit(rng.standard_normal((70_000, 16)))
    index = vectors.build_faiss_index(data, np.arange(len(data)), kind="ivf", nlist=2048)
    allowed = np.arange(0, len(data), 2)  # half: far more rows than one search scans (no exact scan)
    faiss.cvar.indexIVF_stats.reset()
    vectors.search(index, data[:1], 10, vectors.Allowed(allowed))
    rows = faiss.cvar.indexIVF_stats.ndis  # allowed rows scanned by the one query
    assert rows >= vectors.filtered_rows(181, len(data), 2048, len(allowed))


@pytest.mark.parametrize("fraction", [None, 0.3])
def test_one_query_split_between_idle_cores_answers_as_one_thread_does(clustered, monkeypatch, fraction):
    """While a core is idle one query's lists are split between the cores (FAISS's parallel_mode 1), the
    base index's or a filter's own lists; the hits are those one thread finds, and the threads are as before."""
    data, ids = clustered
    monkeypatch.setattr(vectors, "EXACT_SCAN_BYTES", 0)  # a filter too big to scan exactly: its own lists
    index = vectors.build_faiss_index(data, ids, kind="ivf", nlist=32)
    ivf = vectors._as_ivf(index)
    allowed = None if fraction is None else vectors.Allowed(ids[np.random.default_rng(4).random(len(ids)) < fraction])
    searched = ivf if allowed is None else allowed.own_lists(index, ivf)
    threads = faiss.omp_get_max_threads()
    answers = {}
    for idle in (True, False):
        monkeypatch.setattr(vectors, "_idle_core", lambda idle=idle: idle)
        answers[idle] = [vectors.search(index, query[None], 10, allowed) for query in data[:20]]
        assert searched.parallel_mode == (1 if idle else 0)
        assert faiss.omp_get_max_threads() == threads
    for (split_scores, split_ids), (one_scores, one_ids) in zip(answers[True], answers[False]):
        assert np.array_equal(split_ids, one_ids)
        np.testing.assert_allclose(split_scores, one_scores, atol=1e-6)
    vectors.search(index, data[:20], 10, allowed)  # several queries: split by the queries
    assert searched.parallel_mode == 0


def test_an_idle_core_is_told_by_the_runnable_count(tmp_path, monkeypatch):
    monkeypatch.setattr(vectors, "_CORES", 2)
    loadavg = tmp_path / "loadavg"
    for line, idle in (("0.52 0.61 0.84 1/120 1234", True), ("1.90 1.20 0.84 2/120 1234", False),
                       ("3.00 2.00 1.00 5/120 1234", False), ("garbage", True)):
        loadavg.write_text(line + "\n")
        assert vectors._idle_core(str(loadavg)) is idle
    assert vectors._idle_core(str(tmp_path / "missing")) is True  # no count (not Linux): split


def test_importing_the_search_leaves_the_environment_as_it_was():
    """FAISS's OpenMP is told to sleep when it waits only while it loads: torch, loaded later, keeps its own
    default, and a policy the user chose is kept."""
    import os
    import subprocess
    import sys

    code = "import os, indexer.store.vectors; print(os.environ.get('OMP_WAIT_POLICY'))"
    for given, seen in ((None, "None"), ("ACTIVE", "ACTIVE")):
        env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(Path(__file__).parents[1])},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == seen
