"""Vectors -> FAISS index, and id-filtered top-k search over it.

The FAISS index is a cache of the stored vectors (indexer.store.vector_file); ids are SQLite row ids.
Vectors are L2-normalised, so inner product is cosine similarity.

Index type grows with the collection (measured in benchmarks/bench_search.py, 2 CPU cores, D=1024),
the first that fits a memory budget (`mi-index --faiss-memory GB`, kept in the index; without one,
DEFAULT_MEMORY_BUDGET, 4 GB):

- up to FLAT_MAX_VECTORS (50,000) rows: exact search, `IndexIDMap2(IndexFlatIP)`. A query scans
  every vector: ~5 ms at 10k, ~25 ms at 50k, ~90 ms at 200k (one thread); results are exact.
- above it: `IndexIVFScalarQuantizer` (fp16 storage, half the memory of float32, inner product,
  spherical k-means with about sqrt(N) lists). A query scans `unfiltered_nprobe` lists (64; 96 of 1024).
  fp16 changes scores by ~1e-4, far below the gap between neighbours. At 1M clustered vectors:
  build 35-60 s, 2 GB; nprobe 64 of 1024 lists: p50 ~16 ms, recall@10 ~0.97 (32: 9-12 ms, 0.95).
  Within the default budget up to ~1.9M vectors.
- beyond: IVF-PQ with 4-bit codes scanned by SIMD table lookups (`IndexIVFPQFastScan`), m bytes per
  vector (2m sub-quantizers, the most that fit, at most D/4 of them: 128 bytes at D=1024, so 1.3 GB at
  10M), trained on a sample. Its scores are coarse, so the Searcher fetches RERANK_FACTOR times k
  candidates (FILTERED_RERANK_FACTOR under a filter) and ranks them by the exact stored vectors.
  Measured on 200k clustered synthetic vectors, nprobe 32 of 512 lists, one thread: recall@10 1.000
  after re-ranking 10 times k, 0.9 ms a query, trained in 9 s; 8-bit PQ of 256 bytes: the same recall,
  4.7 ms, trained in 206 s (and on a loaded machine earlier: 8-bit PQ-256 0.54 from the codes alone,
  0.96 after re-ranking 4 times k; IVF fp16 over the same lists 0.97 alone, 51-97 ms).

Filters are applied *inside* the scan through an IDSelector, never after the top-k cut, so
`k` filtered hits come back whenever `k` rows pass the filter. A filter's ids become an `Allowed`
(its bitmap selector, and per IVF index the allowed rows in each list), kept by the Searcher per
generation. A filtered IVF search probes the closest lists *that hold allowed rows* until
`filtered_rows` of them are scanned: the rows of `filtered_nprobe` lists (64 up to 1024 lists, 512 of
4096) times fraction**(1/6). A filter's top 10 lie deeper in the unfiltered ranking (at 10% about its
top 100), so it needs more lists than nprobe, but fewer than the 1/fraction times as many that the old
rule probed (1M clustered, 10%: recall@10 0.986 there, ~0.96 with 2/3 of the rows; sqrt(1/fraction)
lists fell to 0.91). When that would scan every allowed row anyway (1% at 1M) and their vectors fit
EXACT_SCAN_BYTES, the allowed rows are decoded once into a flat index and scanned exactly: testing each
of a million list entries against the filter cost more than the ten thousand distances (23 ms -> 5 ms
under load). Otherwise, when its rows' codes fit OWN_LISTS_BYTES, the filter gets inverted lists of its
own (the same lists, holding a copy of its rows' codes only, built on its first search): the probed
lists are read in order with no row tested against the filter (10% at 1M: 3-4x faster than the
selector over the same lists; 205 MB). Fast-scan IVF-PQ codes are taken out of their blocks and packed
again for it (10% of 10M: 1.3-1.8 s once, 136 MB; at 200k such lists scanned 6x faster than the
selector). Larger filters use the selector over the base index's lists. Under IVF-PQ (fast scan) a
probed list costs the same however few of its rows are allowed, so a filter whose probed lists hold over
STORED_SCAN_RATIO times its rows (a 1% folder spread over every list) scans its rows' stored vectors
exactly instead, as a float16 flat index kept with the filter (1M: 27 -> 8 ms).

Threads: one query's lists are split between the cores while another core is idle (`_threads_for`; 1M,
fp16, 2 cores, p50 over 4 runs: unfiltered 29.0 -> 22.2 ms, 10% modality 16.2 -> 13.0); with every core
busy, and for a flat scan, one thread searches a query. Several queries are split between the cores.
FAISS's OpenMP threads sleep between searches (`_import_faiss`): spinning, they took the cores other work
needed.

GPU: `to_gpu(index)` clones the index onto the GPU when faiss was built with GPU support and a
GPU is present; filtered searches stay on the CPU copy (GPU indexes take no IDSelector).
"""
from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import numpy as np


def _import_faiss():
    """faiss, its OpenMP threads sleeping when they wait (OMP_WAIT_POLICY=PASSIVE, read by the libgomp that
    faiss-cpu bundles once, as it loads; torch's own copy keeps its default, and a policy set by the user
    stays): a search's threads then leave the cores to other work between searches."""
    chosen = "OMP_WAIT_POLICY" in os.environ
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import faiss
    finally:
        if not chosen:
            del os.environ["OMP_WAIT_POLICY"]
    return faiss


faiss = _import_faiss()

log = logging.getLogger(__name__)

FLAT_MAX_VECTORS = 50_000   # above this many rows, build an IVF (ANN) index
DEFAULT_NPROBE = 64         # lists scanned per query in an IVF index (see bench_search.py)
_BITMAP_MAX_ID = 1 << 30    # ids below this use a bitmap selector (O(1) membership, max_id/8 bytes)
RERANK_FACTOR = 10          # IVF-PQ: candidates fetched per hit, then ranked by exact vectors
# IVF-PQ, a filtered search: a filter's top 10 lie where the 4-bit codes' scores are closer together. 10M
# images, 50 "more like this" / 50 nearby queries, 10% dates: recall@10 0.936 / 0.950 at 10x, 0.944 /
# 0.960 at 15x, 0.956 / 0.964 at 20x (10% modality 0.960 / 0.952 -> 0.968 / 0.960).
FILTERED_RERANK_FACTOR = 20
_ID_BYTES = 8               # an int64 id per vector in the inverted lists
DEFAULT_MEMORY_BUDGET = 4_000_000_000  # bytes of FAISS index without --faiss-memory: 10M fp16 would be 20 GB
ADD_CHUNK = 65_536          # vectors converted and added at a time while building (256 MB float32 at D=1024)
FILTERED_ROWS_EXPONENT = 1 / 6  # filtered IVF: allowed rows scanned = unfiltered rows x fraction**this
EXACT_SCAN_BYTES = 64 << 20     # a filter allowing at most this much float32 vectors may be scanned exactly
OWN_LISTS_BYTES = 256 << 20     # a filter whose rows' codes fit this gets inverted lists of its own (a copy)
STORED_SCAN_RATIO = 8           # IVF-PQ: scan a filter's stored vectors when the lists hold this many times its rows


def ivf_lists(n: int) -> int:
    """Number of IVF lists for `n` vectors: about sqrt(n), a power of two, 64..8192 (1M -> 1024).
    4*sqrt(n) lists scan fewer vectors per query but took over 5 minutes to build at 1M on 2 cores."""
    return int(min(8192, max(64, 2 ** round(math.log2(math.sqrt(max(n, 1)))))))


def choose_kind(n: int, dim: int, memory_budget: int | None = None) -> str:
    """"flat", "ivf" or "ivfpq" for n vectors of dim floats: the first that fits the budget (bytes;
    DEFAULT_MEMORY_BUDGET when none is given) of flat (up to FLAT_MAX_VECTORS only), IVF fp16 and
    IVF-PQ. With the default: flat to 50k, IVF fp16 to ~1.9M, IVF-PQ (128 bytes) above (to ~29M)."""
    memory_budget = memory_budget or DEFAULT_MEMORY_BUDGET
    if n <= FLAT_MAX_VECTORS and n * (dim * 4 + _ID_BYTES) <= memory_budget:
        return "flat"
    if n >= 64 and n * (dim * 2 + _ID_BYTES) <= memory_budget:
        return "ivf"
    return "ivfpq"


def pq_bytes(n: int, dim: int, memory_budget: int) -> int:
    """Bytes per vector of an IVF-PQ index within the budget: 4-bit codes of 2 x bytes sub-quantizers,
    the most that fit, a divisor of dim, at most dim/4 of them (128 bytes at D=1024). ValueError when
    even 2 bytes per vector do not fit."""
    for m in sorted((m for m in range(4, dim // 4 + 1, 2) if dim % m == 0), reverse=True):
        if n * (m // 2 + _ID_BYTES) <= memory_budget:
            return m // 2
    raise ValueError(f"{n} vectors need at least {n * (2 + _ID_BYTES) / 1e9:.3f} GB in an IVF-PQ index; "
                     f"the budget is {memory_budget / 1e9:.3f} GB")


def build_faiss_index(vectors, ids: np.ndarray, *, kind: str = "auto",
                      nlist: int | None = None, train_size: int | None = None,
                      memory_budget: int | None = None) -> faiss.Index:
    """An inner-product index over L2-normalised `vectors` (N, D) with int64 `ids`: an array, or
    rows read on indexing (indexer.store.vector_file.StoredRows), added ADD_CHUNK at a time.

    kind: "auto" (`choose_kind` with `memory_budget`, in bytes), "flat" (exact), "ivf" (fp16)
    or "ivfpq" (the finest codes within `memory_budget`, else DEFAULT_MEMORY_BUDGET: 128 bytes at D=1024)."""
    if isinstance(vectors, np.ndarray) or not hasattr(vectors, "shape"):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(vectors.shape) != 2 or len(vectors) != len(ids):
        raise ValueError(f"vectors must be (N, D) with N ids; got {vectors.shape} and {ids.shape}")
    n, dim = vectors.shape
    if kind == "auto":
        kind = choose_kind(n, dim, memory_budget)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "ivf":
        index = _trained_ivf(vectors, nlist or ivf_lists(n), train_size)
    elif kind == "ivfpq":
        m = pq_bytes(n, dim, memory_budget or DEFAULT_MEMORY_BUDGET)
        index = _trained_ivf(vectors, nlist or ivf_lists(n), train_size, pq_bytes_per_vector=m)
    else:
        raise ValueError(f"unknown index kind {kind!r}; use 'auto', 'flat', 'ivf' or 'ivfpq'")
    for start in range(0, n, ADD_CHUNK):  # float32 copies of a chunk at a time (the source may be a file)
        index.add_with_ids(np.ascontiguousarray(vectors[start:start + ADD_CHUNK], dtype=np.float32),
                           ids[start:start + ADD_CHUNK])
    return index


def _trained_ivf(vectors: np.ndarray, nlist: int, train_size: int | None,
                 pq_bytes_per_vector: int | None = None) -> faiss.Index:
    n, dim = vectors.shape
    nlist = max(1, min(nlist, n // 32))  # 32 training points per list at least
    quantizer = faiss.IndexFlatIP(dim)
    if pq_bytes_per_vector:
        # 4-bit codes scanned with SIMD lookups (FAISS "fast scan"): against 8-bit PQ of the same bytes,
        # on 200k clustered vectors (512 lists, 32 probed, one thread), 0.9 ms a query instead of 4.7 and
        # trained in 9 s instead of 206, recall@10 1.000 for both after re-ranking 10x. 16 centroids per
        # sub-quantizer want ~40 x 16 training points.
        index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, 2 * pq_bytes_per_vector, 4,
                                         faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.min_points_per_centroid = 1  # a small sample is a choice here, not a mistake
        train_size = max(train_size or 32 * nlist, 40 * 16)
    else:
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True     # centroids on the unit sphere, like the data
    index.cp.niter = 10
    index.cp.min_points_per_centroid = 16  # we sample 32 per list on purpose: no warning
    # k-means on a sample: 32 points per list is plenty for coarse lists and keeps 1M builds short.
    sample = min(n, train_size or 32 * nlist)
    rows = np.random.default_rng(0).choice(n, size=sample, replace=False) if sample < n else slice(None)
    index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    index.own_fields = True
    index.quantizer = quantizer
    quantizer.this.disown()       # owned by the IVF index now
    return index


def index_kind(index: faiss.Index) -> str:
    """'flat', 'ivf', 'ivfpq' or the FAISS class name."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    if isinstance(faiss.downcast_index(inner), (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)):
        return "ivfpq"
    if isinstance(faiss.downcast_index(inner), faiss.IndexIVF):
        return "ivf"
    return type(inner).__name__


def search(index: faiss.Index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | Allowed | None = None,
           *, nprobe: int | None = None, gpu: faiss.Index | None = None,
           excluded_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids), each (Q, min(k, rows that can answer)), best first; ids -1 where an
    approximate index finds fewer.

    `allowed_ids` (ids, or an `Allowed` kept for a filter asked again) restricts the search before
    the cut, so k filtered hits come back when k exist; an empty one gives no hits. `nprobe`
    overrides `unfiltered_nprobe` for IVF indexes, and `filtered_nprobe` for a filtered search (which
    scans `filtered_rows(...)` allowed rows, see `_filtered_ivf_search`). `gpu`: a GPU copy of `index`
    (`to_gpu`), used for unfiltered searches only: the classic FAISS GPU kernels ignore an IDSelector
    (faiss issue #3924) and would return rows outside the filter. `excluded_ids`: rows never returned
    (removed from SQLite since the index was loaded)."""
    allowed = allowed_ids if allowed_ids is None or isinstance(allowed_ids, Allowed) else Allowed(allowed_ids)
    if gpu is not None and allowed is None:
        index = gpu
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    # No more results than rows that can answer: FAISS allocates (Q, k) results up front, and
    # `-k 1000000000` must not end in a MemoryError.
    k = min(int(k), index.ntotal if allowed is None else min(index.ntotal, len(allowed)))
    if k <= 0 or index.ntotal == 0 or (allowed is not None and len(allowed) == 0):
        return (np.full((len(queries), max(k, 0)), -np.inf, dtype=np.float32),
                np.full((len(queries), max(k, 0)), -1, dtype=np.int64))
    sel = allowed.selector if allowed is not None else None
    if excluded_ids is not None and len(excluded_ids) and sel is None:  # an allowed set holds no removed row
        inner = _selector(excluded_ids)
        sel = faiss.IDSelectorNot(inner)
        sel.referenced_selector = inner  # a raw pointer inside: keep it alive
    ivf = _as_ivf(index)
    # A filtered IVF search chooses its threads itself: it may scan a flat index, or the filter's own lists.
    with _threads_for(ivf if allowed is None else None, len(queries)):
        if ivf is not None and allowed is not None:
            scores, ids = _filtered_ivf_search(index, ivf, queries, k, allowed, nprobe or filtered_nprobe(ivf.nlist))
        else:
            if ivf is not None:
                params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, nprobe or unfiltered_nprobe(ivf.nlist)),
                                                   sel=sel)
            else:
                params = faiss.SearchParameters(sel=sel) if sel is not None else None
            scores, ids = index.search(queries, k, params=params)
    scores[ids < 0] = -np.inf
    return scores, ids


def unfiltered_nprobe(nlist: int) -> int:
    """Lists an unfiltered query scans: DEFAULT_NPROBE, 3/32 of the lists from 682 to 1024 lists (96 of 1024
    at 1M), then growing as nlist**1.5 (768 of 4096 at 10M), as `filtered_nprobe` does. Measured at 1M (1024
    lists, float16-stored vectors, bench_scale's queries): 64 lists gave recall@10 0.942-0.955, 96 gave 0.975
    for 1.6 times the time; at 10M (4096 lists, IVF-PQ): 384 lists 0.904, 768 0.960, 1024 0.968."""
    if nlist <= 1024:
        return max(DEFAULT_NPROBE, nlist * 3 // 32)
    return round(96 * (nlist / 1024) ** 1.5)


def filtered_nprobe(nlist: int) -> int:
    """The lists whose rows a filtered search's count starts from (`filtered_rows`): DEFAULT_NPROBE up to 1024
    lists, then growing as nlist**1.5 (512 of 4096 lists at 10M images). Finer lists scatter a query's
    neighbours over more of them, and a filter's top 10 lie deeper still. Measured at 10M (bench_scale's
    queries, IVF-PQ fast scan, 4096 lists, each filter in lists of its own; 10% modality / 10% dates
    recall@10): 64 lists 0.847 / 0.830, 256 0.940 / 0.943, 512 0.957 / 0.973, 768 0.967 / 0.977, each 37-46 ms
    a query on 2 cores, the stored vectors' reads for re-ranking included; at 1M (1024 lists, fp16) 64 gave
    0.976 / 0.970."""
    return max(DEFAULT_NPROBE, round(DEFAULT_NPROBE * (nlist / 1024) ** 1.5))


def filtered_rows(nprobe: int, rows: int, nlist: int, allowed: int) -> int:
    """Allowed rows a filtered IVF search scans (closest lists first) for `nprobe`: the rows an unfiltered
    search scans (nprobe lists), times FILTERED_ROWS_EXPONENT-th power of the allowed fraction, and all
    of them when nprobe covers every list. A filter's top k lie deeper in the unfiltered ranking, so it
    needs more lists; but not the 1/fraction times more that keeps all nprobe lists' worth of allowed rows
    (measured in benchmarks/bench_scale.py, see FILTERED_ROWS_EXPONENT)."""
    if nprobe >= nlist:
        return allowed
    fraction = min(1.0, allowed / max(rows, 1))
    return math.ceil(nprobe * rows / nlist * fraction ** FILTERED_ROWS_EXPONENT)


def _filtered_ivf_search(index: faiss.Index, ivf: faiss.IndexIVF, queries: np.ndarray, k: int, allowed: Allowed,
                         nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """A filtered IVF search that probes, for each query, the closest lists holding allowed rows until
    `filtered_rows` of them are scanned: lists without an allowed row are never opened (a folder or
    modality that lives in a few lists costs those lists), and a selective filter ends as an exact
    scan of the allowed rows (every list that holds one)."""
    per_list = allowed.per_list(index, ivf)
    held = int(per_list.sum())
    target = max(k, filtered_rows(nprobe, ivf.ntotal, ivf.nlist, held))  # k rows scanned: k hits when k pass
    coarse = index_kind(ivf) == "ivfpq"
    if target >= held and held * ivf.d * 4 <= EXACT_SCAN_BYTES and not coarse:
        # Every allowed row would be scanned: reading their vectors alone (decoded once per filter) beats
        # opening every list and testing each of its rows against the filter (1% at 1M: ~4x faster).
        return allowed.exact(index, ivf).search(queries, k)
    centroid_scores, nearest = ivf.quantizer.search(queries, ivf.nlist)  # every list, closest first
    chosen = np.full(nearest.shape, -1, dtype=np.int64)  # -1: no list (FAISS skips it)
    scores_of = np.zeros(nearest.shape, dtype=np.float32)
    for row in range(len(queries)):
        lists = nearest[row][nearest[row] >= 0]
        counts = per_list[lists]
        holding = counts > 0
        lists, reach = lists[holding], np.cumsum(counts[holding])
        probes = min(len(lists), int(np.searchsorted(reach, target)) + 1)
        chosen[row, :probes] = lists[:probes]
        scores_of[row, :probes] = centroid_scores[row][nearest[row] >= 0][holding][:probes]
    probes = max(1, int((chosen >= 0).sum(axis=1).max()))
    if coarse and allowed.stored is not None and held * ivf.d * 2 <= OWN_LISTS_BYTES:
        # Fast-scan codes cost the same whether a row is allowed or not: when the probed lists hold many
        # times the allowed rows (a 1% folder spread over every list), their stored vectors, scanned
        # exactly, cost less (STORED_SCAN_RATIO: a float16 row against a 128-byte code).
        scanned = _list_layout(index, ivf)[2][chosen[chosen >= 0]].sum() / len(queries)
        if scanned > STORED_SCAN_RATIO * held:
            return allowed.stored_exact(index).search(queries, k)
    chosen, scores_of = np.ascontiguousarray(chosen[:, :probes]), np.ascontiguousarray(scores_of[:, :probes])
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    own = allowed.own_lists(index, ivf) if _own_lists_fit(ivf, held) else None
    # Its own lists hold the allowed rows only, one after another: no row tested against the filter, and the
    # codes read in order (10% at 1M: 12-16 ms instead of 42-62 for the same lists through the selector).
    searched, params = (own, faiss.SearchParametersIVF(nprobe=probes)) if own is not None else \
        (ivf, faiss.SearchParametersIVF(nprobe=probes, sel=allowed.selector))
    # The C++ call: faiss's Python wrapper of search_preassigned takes no parameters (no selector).
    with _threads_for(searched, len(queries)):
        searched.search_preassigned_c(len(queries), faiss.swig_ptr(queries), k, faiss.swig_ptr(chosen),
                                      faiss.swig_ptr(scores_of), faiss.swig_ptr(scores), faiss.swig_ptr(ids), False,
                                      params)
    return scores, ids


def _own_lists_fit(ivf: faiss.IndexIVF, rows: int) -> bool:
    """Whether a filter allowing `rows` of `ivf` gets lists of its own (fp16 IVF or fast-scan IVF-PQ;
    within OWN_LISTS_BYTES)."""
    kinds = (faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQFastScan)
    return (type(ivf) in kinds and getattr(ivf, "bbs", FAST_SCAN_BLOCK) == FAST_SCAN_BLOCK  # the layout read here
            and rows * (ivf.code_size + _ID_BYTES) <= OWN_LISTS_BYTES)


def _empty_twin(ivf: faiss.IndexIVF) -> faiss.IndexIVF:
    """An IVF index with the trained state of `ivf` (an IndexIVFScalarQuantizer or IndexIVFPQFastScan: its
    lists' centres and its codec) and empty lists."""
    quantizer = faiss.clone_index(ivf.quantizer)
    if type(ivf) is faiss.IndexIVFPQFastScan:
        twin = faiss.IndexIVFPQFastScan(quantizer, ivf.d, ivf.nlist, ivf.M, ivf.nbits, ivf.metric_type, ivf.bbs)
        twin.pq = ivf.pq  # the trained product quantizer (copied)
        twin.by_residual = ivf.by_residual
        twin.precompute_table()
    else:
        twin = faiss.IndexIVFScalarQuantizer(quantizer, ivf.d, ivf.nlist, ivf.sq.qtype, ivf.metric_type,
                                             ivf.by_residual)
        twin.sq = ivf.sq  # the trained scalar quantizer (copied)
    twin.own_fields = True
    quantizer.this.disown()  # owned by the twin now
    twin.is_trained = True
    return twin


# A fast-scan block holds FAST_SCAN_BLOCK codes, 16 bytes a sub-quantizer: byte j holds the sub-quantizer's 4-bit
# code of row PACKED_ORDER[j] of the block in its low nibble and of row PACKED_ORDER[j] + 16 in its high one
# (faiss/impl/fast_scan: pq4_pack_codes).
FAST_SCAN_BLOCK = 32
PACKED_ORDER = np.array([0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15])
_BYTE_OF_ROW = np.argsort(PACKED_ORDER)  # the byte holding row r (and r + 16) of a block


def _codes_at(blocks: np.ndarray, pairs: int, rows: np.ndarray) -> np.ndarray:
    """The 4-bit codes of `rows` (positions in a list) in its fast-scan `blocks` (bytes): one uint8 per
    sub-quantizer. Only those rows' nibbles are read (a tenth of a list costs a tenth)."""
    laid = blocks.reshape(-1, pairs * 2, 16)  # (block, sub-quantizer, byte)
    within = rows % FAST_SCAN_BLOCK
    found = laid[rows // FAST_SCAN_BLOCK, :, _BYTE_OF_ROW[within & 15]]  # (rows, sub-quantizers)
    return ((found >> (4 * (within >= 16)).astype(np.uint8)[:, None]) & 15).astype(np.uint8)


def _packed_codes(codes: np.ndarray, pairs: int) -> np.ndarray:
    """`codes` (rows of one uint8 per sub-quantizer) packed into fast-scan blocks, the last padded with zero
    codes (as FAISS pads it)."""
    slots = -(-len(codes) // FAST_SCAN_BLOCK) * FAST_SCAN_BLOCK
    padded = np.zeros((slots, pairs * 2), dtype=np.uint8)
    padded[:len(codes)] = codes
    laid = padded.reshape(-1, FAST_SCAN_BLOCK, pairs * 2)
    blocks = laid[:, PACKED_ORDER] | (laid[:, PACKED_ORDER + 16] << 4)  # (block, byte, sub-quantizer)
    return np.ascontiguousarray(blocks.transpose(0, 2, 1)).reshape(-1)


class Allowed:
    """The ids a filter allows, in the form a search uses: the FAISS selector (a bitmap, max id / 8
    bytes), built once, and for each IVF index searched the number of allowed rows in each of its
    lists (built on the first search there). A caller that asks the same filter again (the web page
    does at every page and refinement) keeps one and pays neither again (retrieval.Searcher does,
    per generation). Each part is built once, under a lock: safe to share between threads."""

    def __init__(self, ids: np.ndarray, stored=None) -> None:
        """`stored`: ids -> their exact float32 vectors (indexer.store.vector_file.VectorFile.read), for
        scanning a small filter's rows exactly under an IVF-PQ index (`stored_exact`)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.stored = stored
        self._count = len(ids)
        self._bitmap: np.ndarray | None = None
        self._ids: np.ndarray | None = None
        if len(ids) and int(ids.min()) >= 0 and int(ids.max()) < _BITMAP_MAX_ID:
            bits = np.zeros(int(ids.max()) + 1, dtype=bool)
            bits[ids] = True
            self._bitmap = np.packbits(bits, bitorder="little")
            self.selector = faiss.IDSelectorBitmap(len(self._bitmap), faiss.swig_ptr(self._bitmap))  # n: bytes
            self.selector.referenced_bitmap = self._bitmap  # the selector holds a raw pointer: keep it alive
        else:
            self._ids = ids
            self.selector = faiss.IDSelectorBatch(ids) if len(ids) else None
        self._per_list: weakref.WeakKeyDictionary[faiss.Index, np.ndarray] = weakref.WeakKeyDictionary()
        self._exact: weakref.WeakKeyDictionary[faiss.Index, faiss.Index] = weakref.WeakKeyDictionary()
        self._own: weakref.WeakKeyDictionary[faiss.Index, faiss.Index] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # server threads search with one Allowed: each part is built once

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Memory held (for a cache's bound): the bitmap or ids, the per-list counts and the decoded rows."""
        held = self._bitmap if self._bitmap is not None else self._ids
        with self._lock:
            return (int(held.nbytes) + sum(int(counts.nbytes) for counts in self._per_list.values())
                    + sum(flat.ntotal * (faiss.downcast_index(flat.index).code_size + _ID_BYTES)
                          for flat in self._exact.values())
                    + sum(own.ntotal * (own.code_size + _ID_BYTES) + own.nlist * own.d * 4
                          for own in self._own.values()))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of `ids` is allowed (a bool array)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._bitmap is None:
            return np.isin(ids, self._ids)
        inside = (ids >= 0) & (ids < len(self._bitmap) * 8)
        safe = np.where(inside, ids, 0)
        return inside & ((self._bitmap[safe >> 3] >> (safe & 7)) & 1).astype(bool)

    def per_list(self, index: faiss.Index, ivf: faiss.IndexIVF) -> np.ndarray:
        """Allowed rows in each list of `ivf` (the IVF inside `index`, which keys the cache)."""
        with self._lock:
            return self._count_per_list_unlocked(index, ivf)

    def _count_per_list_unlocked(self, index: faiss.Index, ivf: faiss.IndexIVF) -> np.ndarray:
        if index in self._per_list:
            return self._per_list[index]
        list_ids, starts, sizes = _list_layout(index, ivf)
        counts = np.zeros(ivf.nlist, dtype=np.int64)
        filled = sizes > 0  # reduceat would give an empty list its next list's first row
        if filled.any():
            counts[filled] = np.add.reduceat(self.contains(list_ids).astype(np.int64), starts[filled])
        self._per_list[index] = counts
        return counts

    def stored_exact(self, index: faiss.Index) -> faiss.Index:
        """A flat float16 index of the allowed rows' stored vectors (`stored`), built on the first search
        under `index`: exact where an IVF-PQ index's codes are coarse, and half the bytes of float32."""
        with self._lock:
            if index not in self._exact:
                ids = np.sort(self._ids) if self._bitmap is None else \
                    np.flatnonzero(np.unpackbits(self._bitmap, bitorder="little"))
                flat = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(index.d, faiss.ScalarQuantizer.QT_fp16,
                                                                    faiss.METRIC_INNER_PRODUCT))
                for start in range(0, len(ids), ADD_CHUNK):
                    flat.add_with_ids(self.stored(ids[start:start + ADD_CHUNK]), ids[start:start + ADD_CHUNK])
                self._exact[index] = flat
            return self._exact[index]

    def own_lists(self, index: faiss.Index, ivf: faiss.IndexIVF) -> faiss.Index:
        """An IVF index of the allowed rows of `ivf` (fp16 or fast-scan IVF-PQ) only: the same lists, each
        holding a copy of its allowed rows' codes (code_size + 8 bytes a row), built on the first search."""
        with self._lock:
            return self._own.get(index) if index in self._own else self._copied_lists(index, ivf)

    def _copied_lists(self, index: faiss.Index, ivf: faiss.IndexIVF) -> faiss.Index:
        list_ids, starts, sizes = _list_layout(index, ivf)
        own = _empty_twin(ivf)
        fast_scan = type(ivf) is faiss.IndexIVFPQFastScan
        pairs = ivf.M2 // 2 if fast_scan else 0
        block_bytes = pairs * 2 * 16  # a fast-scan block: 16 bytes a sub-quantizer
        allowed = self.contains(list_ids)  # one pass: 4096 small ones took 0.4 s at 10M
        for number in np.flatnonzero(self._count_per_list_unlocked(index, ivf)).tolist():
            size, first = int(sizes[number]), int(starts[number])
            ids = list_ids[first:first + size]
            keep = np.flatnonzero(allowed[first:first + size])
            pointer = ivf.invlists.get_codes(number)
            if fast_scan:  # the allowed rows' codes taken out of the blocks and packed again
                blocks = faiss.rev_swig_ptr(pointer, -(-size // FAST_SCAN_BLOCK) * block_bytes)
                codes = _packed_codes(_codes_at(blocks, pairs, keep), pairs)
            else:
                codes = np.ascontiguousarray(faiss.rev_swig_ptr(pointer, size * ivf.code_size)
                                             .reshape(size, ivf.code_size)[keep])
            ivf.invlists.release_codes(number, pointer)
            kept = np.ascontiguousarray(ids[keep])
            own.invlists.add_entries(number, len(keep), faiss.swig_ptr(kept), faiss.swig_ptr(codes))
            own.ntotal += len(keep)
        self._own[index] = own
        return own

    def exact(self, index: faiss.Index, ivf: faiss.IndexIVF) -> faiss.Index:
        """A flat (exact) index of the allowed rows of `ivf`, decoded from its lists (fp16: within 1e-3 of
        the stored vectors, which re-score every hit anyway), built on the first search there."""
        with self._lock:
            return self._exact.get(index) if index in self._exact else self._decoded(index, ivf)

    def _decoded(self, index: faiss.Index, ivf: faiss.IndexIVF) -> faiss.Index:
        list_ids, starts, _sizes = _list_layout(index, ivf)
        where = np.flatnonzero(self.contains(list_ids))
        lists = np.searchsorted(starts, where, side="right") - 1  # an empty list shares its start: the next wins
        offsets = where - starts[lists]
        if isinstance(ivf, faiss.IndexIVFScalarQuantizer):  # decoded in one call: 10k rows in ms, not 0.5 s
            codes = np.empty((len(where), ivf.code_size), dtype=np.uint8)
            numbers, firsts = np.unique(lists, return_index=True)
            for number, first, last in zip(numbers.tolist(), firsts.tolist(), [*firsts[1:].tolist(), len(where)]):
                size = ivf.invlists.list_size(number)
                pointer = ivf.invlists.get_codes(number)
                stored = faiss.rev_swig_ptr(pointer, size * ivf.code_size).reshape(size, ivf.code_size)
                codes[first:last] = stored[offsets[first:last]]
                ivf.invlists.release_codes(number, pointer)
            rows = ivf.sq.decode(codes)
            if ivf.by_residual:
                rows += ivf.quantizer.reconstruct_n(0, ivf.nlist)[lists]
        else:
            rows = np.empty((len(where), ivf.d), dtype=np.float32)
            for row, (number, offset) in enumerate(zip(lists.tolist(), offsets.tolist())):
                ivf.reconstruct_from_offset(number, offset, faiss.swig_ptr(rows[row]))
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(ivf.d))
        flat.add_with_ids(rows, list_ids[where])
        self._exact[index] = flat
        return flat


_layouts: weakref.WeakKeyDictionary[faiss.Index, tuple[np.ndarray, ...]] = weakref.WeakKeyDictionary()
_layouts_lock = threading.Lock()


def _list_layout(index: faiss.Index, ivf: faiss.IndexIVF) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the ids of every list, one after another; where each list starts; its size), read once per index
    (8 bytes a row, beside the index's 2 KB): each new filter counts its rows per list in one pass."""
    with _layouts_lock:
        return _layouts[index] if index in _layouts else _read_layout(index, ivf)


def _read_layout(index: faiss.Index, ivf: faiss.IndexIVF) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lists = ivf.invlists
    sizes = np.array([lists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    list_ids = np.empty(int(sizes.sum()), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    for number in np.flatnonzero(sizes):
        ids = lists.get_ids(int(number))
        list_ids[starts[number]:starts[number] + sizes[number]] = faiss.rev_swig_ptr(ids, int(sizes[number]))
        lists.release_ids(int(number), ids)
    layout = _layouts[index] = (list_ids, starts, sizes)
    return layout


@contextmanager
def _threads_for(ivf: faiss.IndexIVF | None, queries: int) -> Iterator[None]:
    """OpenMP threads for a search of `queries` queries, over the lists of `ivf` (None: no IVF lists, such
    as a flat index's scan). Several queries are split between every core (FAISS's default); one query's
    lists between the cores while another core is idle (FAISS's parallel_mode 1), else one thread scans
    them, as it scans one query of a flat index (a flat scan of one query gained nothing from a second
    thread: 1% at 1M, 6.9-7.7 ms on one, 8.4-8.8 on two). A search that runs meanwhile from another thread
    may start in this one's mode: only its speed differs."""
    split = ivf is not None and queries == 1 and _idle_core()
    if ivf is not None:
        ivf.parallel_mode = 1 if split else 0
    if queries > 1:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(_THREADS if split else 1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _idle_core(loadavg: str = "/proc/loadavg") -> bool:
    """Whether a core of this process's is free now: fewer runnable threads on the machine (this one
    among them; Linux's /proc/loadavg, 0.02 ms to read) than cores. A query split over a core that other
    work holds waits for its part there: with one core of two busy, p95 grew from 17-32 ms to 40-56.
    True where the count cannot be read."""
    try:
        with open(loadavg, "rb") as f:
            runnable = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return True
    return runnable < _CORES


_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_THREADS = faiss.omp_get_max_threads()  # OpenMP's own count (OMP_NUM_THREADS, else the cores)


def _as_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def _selector(ids: np.ndarray) -> faiss.IDSelector:
    return Allowed(ids).selector


def to_gpu(index: faiss.Index) -> faiss.Index:
    """The index on GPU 0 when this faiss has GPU support and a GPU is present, else `index`."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    try:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.referenced_resources = resources
        return gpu_index
    except RuntimeError as error:  # an index type without a GPU version: stay on the CPU
        log.info("keeping the FAISS index on the CPU: %s", error)
        return index
