"""Vectors -> FAISS index, and id-filtered top-k search over it.

The FAISS index is a cache of the stored vectors (indexer.store.vector_file); ids are SQLite row ids.
Vectors are L2-normalised, so inner product is cosine similarity.

Index type grows with the collection (measured in benchmarks/bench_search.py, 2 CPU cores, D=1024),
the first that fits a memory budget (`mi-index --faiss-memory GB`, kept in the index; without one,
DEFAULT_MEMORY_BUDGET, 4 GB):

- up to FLAT_MAX_VECTORS (50,000) rows: exact search, `IndexIDMap2(IndexFlatIP)`. A query scans
  every vector: ~5 ms at 10k, ~25 ms at 50k, ~90 ms at 200k (one thread); results are exact.
- above it: `IndexIVFScalarQuantizer` (fp16 storage, half the memory of float32, inner product,
  spherical k-means with about sqrt(N) lists). A query scans `nprobe` lists (DEFAULT_NPROBE).
  fp16 changes scores by ~1e-4, far below the gap between neighbours. At 1M clustered vectors:
  build 35-60 s, 2 GB; nprobe 64 of 1024 lists: p50 ~16 ms, recall@10 ~0.97 (32: 9-12 ms, 0.95).
  Within the default budget up to ~1.9M vectors.
- beyond: IVF-PQ, m bytes per vector (m sub-quantizers of 8 bits, the largest m that fits, at
  most D/4: 256 at D=1024, so 2.6 GB at 10M), trained on a sample. Its scores are coarse, so the
  Searcher fetches RERANK_FACTOR times k candidates and ranks them by the exact stored vectors.
  Measured on 200k clustered synthetic vectors, nprobe 32 of 512 lists, one thread, on a loaded
  machine: PQ-256 recall@10 0.54 from the codes alone, 0.96 / 1.000 after re-ranking 4 / 10
  times k, p50 23-29 ms (IVF fp16 over the same lists: 0.97 alone, 51-97 ms; SQ8: 0.97, 51-60
  ms). PQ-64 is much coarser: 0.63 after re-ranking 10 times k on 30k hard vectors.

Filters are applied *inside* the scan through an IDSelector, never after the top-k cut, so
`k` filtered hits come back whenever `k` rows pass the filter. For IVF the number of probed lists
is scaled by 1/(fraction of rows allowed), so a selective filter scans more lists (up to all of
them, which is exact search over the allowed rows) and the recall stays at least as high as
unfiltered (1M clustered: 50% allowed ~29 ms, 10% ~33 ms, 1% ~9 ms, recall@10 >= 0.977; a gentler
sqrt scaling was faster but fell to 0.91 at 10%).

GPU: `to_gpu(index)` clones the index onto the GPU when faiss was built with GPU support and a
GPU is present; filtered searches stay on the CPU copy (GPU indexes take no IDSelector).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Iterator

import faiss
import numpy as np

log = logging.getLogger(__name__)

FLAT_MAX_VECTORS = 50_000   # above this many rows, build an IVF (ANN) index
DEFAULT_NPROBE = 64         # lists scanned per query in an IVF index (see bench_search.py)
_BITMAP_MAX_ID = 1 << 30    # ids below this use a bitmap selector (O(1) membership, max_id/8 bytes)
RERANK_FACTOR = 10          # IVF-PQ: candidates fetched per hit, then ranked by exact vectors
_ID_BYTES = 8               # an int64 id per vector in the inverted lists
DEFAULT_MEMORY_BUDGET = 4_000_000_000  # bytes of FAISS index without --faiss-memory: 10M fp16 would be 20 GB
ADD_CHUNK = 65_536          # vectors converted and added at a time while building (256 MB float32 at D=1024)


def ivf_lists(n: int) -> int:
    """Number of IVF lists for `n` vectors: about sqrt(n), a power of two, 64..8192 (1M -> 1024).
    4*sqrt(n) lists scan fewer vectors per query but took over 5 minutes to build at 1M on 2 cores."""
    return int(min(8192, max(64, 2 ** round(math.log2(math.sqrt(max(n, 1)))))))


def choose_kind(n: int, dim: int, memory_budget: int | None = None) -> str:
    """"flat", "ivf" or "ivfpq" for n vectors of dim floats: the first that fits the budget (bytes;
    DEFAULT_MEMORY_BUDGET when none is given) of flat (up to FLAT_MAX_VECTORS only), IVF fp16 and
    IVF-PQ. With the default: flat to 50k, IVF fp16 to ~1.9M, IVF-PQ-256 above (to ~15M)."""
    memory_budget = memory_budget or DEFAULT_MEMORY_BUDGET
    if n <= FLAT_MAX_VECTORS and n * (dim * 4 + _ID_BYTES) <= memory_budget:
        return "flat"
    if n >= 64 and n * (dim * 2 + _ID_BYTES) <= memory_budget:
        return "ivf"
    return "ivfpq"


def pq_bytes(n: int, dim: int, memory_budget: int) -> int:
    """Bytes per vector (sub-quantizers) of an IVF-PQ index within the budget: the largest
    divisor of dim up to dim/4 that fits. ValueError when even 4 bytes per vector do not fit."""
    for m in sorted((m for m in range(4, dim // 4 + 1) if dim % m == 0), reverse=True):
        if n * (m + _ID_BYTES) <= memory_budget:
            return m
    raise ValueError(f"{n} vectors need at least {n * (4 + _ID_BYTES) / 1e9:.3f} GB in an IVF-PQ index; "
                     f"the budget is {memory_budget / 1e9:.3f} GB")


def build_faiss_index(vectors, ids: np.ndarray, *, kind: str = "auto",
                      nlist: int | None = None, train_size: int | None = None,
                      memory_budget: int | None = None) -> faiss.Index:
    """An inner-product index over L2-normalised `vectors` (N, D) with int64 `ids`: an array, or
    rows read on indexing (indexer.store.vector_file.StoredRows), added ADD_CHUNK at a time.

    kind: "auto" (`choose_kind` with `memory_budget`, in bytes), "flat" (exact), "ivf" (fp16)
    or "ivfpq" (within `memory_budget`, default 64 bytes per vector)."""
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
        # 8-bit codes need ~40 x 256 training points per sub-quantizer; fewer vectors get fewer bits
        bits = 8 if n >= 40 * 256 else max(4, int(math.log2(max(n, 16) / 40)))
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_bytes_per_vector, bits, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.min_points_per_centroid = 1  # a small sample is a choice here, not a mistake
        train_size = max(train_size or 32 * nlist, 40 * 256)
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
    if isinstance(faiss.downcast_index(inner), faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(faiss.downcast_index(inner), faiss.IndexIVF):
        return "ivf"
    return type(inner).__name__


def search(index: faiss.Index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
           *, nprobe: int | None = None, gpu: faiss.Index | None = None,
           excluded_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids), each (Q, min(k, rows that can answer)), best first; ids -1 where an
    approximate index finds fewer.

    `allowed_ids` restricts the search before the cut, so k filtered hits come back when k exist;
    an empty `allowed_ids` gives no hits. `nprobe` overrides DEFAULT_NPROBE for IVF indexes.
    `gpu`: a GPU copy of `index` (`to_gpu`), used for unfiltered searches only: the classic FAISS
    GPU kernels ignore an IDSelector (faiss issue #3924) and would return rows outside the filter.
    `excluded_ids`: rows never returned (removed from SQLite since the index was loaded)."""
    if gpu is not None and allowed_ids is None:
        index = gpu
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    # No more results than rows that can answer: FAISS allocates (Q, k) results up front, and
    # `-k 1000000000` must not end in a MemoryError.
    k = min(int(k), index.ntotal if allowed_ids is None else min(index.ntotal, len(allowed_ids)))
    if k <= 0 or index.ntotal == 0 or (allowed_ids is not None and len(allowed_ids) == 0):
        return (np.full((len(queries), max(k, 0)), -np.inf, dtype=np.float32),
                np.full((len(queries), max(k, 0)), -1, dtype=np.int64))
    sel = _selector(allowed_ids) if allowed_ids is not None else None
    if excluded_ids is not None and len(excluded_ids) and sel is None:  # an allowed set holds no removed row
        inner = _selector(excluded_ids)
        sel = faiss.IDSelectorNot(inner)
        sel.referenced_selector = inner  # a raw pointer inside: keep it alive
    ivf = _as_ivf(index)
    if ivf is not None:
        nprobe = nprobe or DEFAULT_NPROBE
        if allowed_ids is not None:  # keep the expected number of allowed rows scanned constant
            nprobe = math.ceil(nprobe * index.ntotal / max(len(allowed_ids), 1))
        params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, nprobe), sel=sel)
    else:
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
    with _threads(1 if len(queries) == 1 else None):
        scores, ids = index.search(queries, k, params=params)
    scores[ids < 0] = -np.inf
    return scores, ids


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run FAISS with `count` OpenMP threads inside the block. One query gains nothing from a
    second thread, and on a busy 2-core machine OpenMP's spinning made it 2-6x slower."""
    if count is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _as_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def _selector(allowed_ids: np.ndarray) -> faiss.IDSelector:
    allowed = np.ascontiguousarray(allowed_ids, dtype=np.int64)
    top = int(allowed.max())
    if int(allowed.min()) >= 0 and top < _BITMAP_MAX_ID:
        bits = np.zeros(top + 1, dtype=bool)
        bits[allowed] = True
        bitmap = np.packbits(bits, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # n: bytes, not bits
        sel.referenced_bitmap = bitmap  # the selector holds a raw pointer: keep the array alive
        return sel
    return faiss.IDSelectorBatch(allowed)


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
