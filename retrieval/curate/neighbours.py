"""All-pairs similarity in bounded memory: every stored vector's k nearest neighbours through
the index's FAISS index (exact up to 50k images, IVF above: see indexer.store.vectors), queried in
batches read from SQLite, and the pairs above a threshold joined into clusters (union-find).

Memory holds the FAISS index, one batch and O(images + pairs) results, never an N x N matrix.
Frames of one file are never each other's neighbours here: a multi-frame file's frames are one
item of a dataset, not duplicates of each other."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer.errors import MIError

DEFAULT_K = 10
# IVF lists scanned per query. Near duplicates share their nearest list, so few suffice; scores
# near the threshold are recomputed exactly. Measured at 100k x 1024 (256 lists, 2 shared cores,
# bench_curate.py --scan-options): the scan of all images takes 726 s probing 32 lists, 186 s
# probing 8, 90 s probing 4, and 863 s exact (float32 GEMM, faiss flat); planted pairs found by
# every option. 8 keeps a margin over the 4 that already found them all.
DEFAULT_NPROBE = 8
EXACT_RECHECK_MARGIN = 0.01  # approximate scores this close to the threshold are recomputed exactly


class IndexChangedError(MIError):
    """mi-index committed while a check was reading: its answer would mix two states."""


@dataclass
class Scan:
    """What one kNN pass over the index found. Arrays are in id order (`ids` sorted)."""

    ids: np.ndarray          # (N,) int64
    nearest: np.ndarray      # (N,) float32: similarity to the nearest other file's image (-inf: none found)
    mean_k: np.ndarray       # (N,) float32: mean similarity to the k nearest (other files)
    neighbours: np.ndarray   # (N, k) int64: the k nearest ids (other files), -1 where fewer
    pairs: np.ndarray        # (P, 2) int64 ids, first < second, similarity >= threshold
    pair_scores: np.ndarray  # (P,) float32, exact
    threshold: float
    kind: str                # the FAISS index kind: flat (exact) or ivf / ivfpq (approximate)

    def position(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, ids)


def scan(reader, *, threshold: float = 1.1, k: int = DEFAULT_K, batch: int = 2048,
         nprobe: int | None = DEFAULT_NPROBE) -> Scan:
    """One pass: each image's k nearest images of other files, and every pair at or above
    `threshold` (cosine) among them. Raises IndexChangedError when mi-index committed meanwhile."""
    from indexer.store import vectors as vector_index

    index, generation = reader.store.load_faiss_with_generation()
    kind = vector_index.index_kind(index)
    columns = reader.columns(["path"])
    ids = columns["id"]
    files = _codes(columns["path"])   # a file number per position: frames of one file share it
    del columns
    n = len(ids)
    nearest = np.full(n, -np.inf, np.float32)
    mean_k = np.full(n, -np.inf, np.float32)
    neighbours = np.full((n, k), -1, np.int64)
    pair_parts, score_parts = [], []
    # Fetch extra candidates: the query itself and frames of its own file are dropped below.
    fetch = min(n, k + 1 + _frames_margin(files)) * (vector_index.RERANK_FACTOR if kind == "ivfpq" else 1)
    for query_ids, queries in reader.batches(batch):
        if len(query_ids) and queries.shape[1] != index.d:
            raise MIError(f"the stored vectors have {queries.shape[1]} dimensions, the FAISS index {index.d}")
        scores, found = vector_index.search(index, queries, fetch, nprobe=nprobe)
        at = np.searchsorted(ids, query_ids)
        found_at = np.searchsorted(ids, np.where(found < 0, 0, found)).clip(0, n - 1)
        valid = (found >= 0) & (ids[found_at] == found)   # rows removed meanwhile drop out
        valid &= files[found_at] != files[at][:, None]    # itself and its own file's frames
        if kind == "ivfpq":  # coarse codes: rank the candidates by the exact vectors
            scores = _exact(reader, queries, found, valid)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(found, order, axis=1), -1)
        nearest[at] = top_scores[:, 0] if k else -np.inf
        finite = np.where(np.isfinite(top_scores), top_scores, np.nan)
        with np.errstate(all="ignore"):
            mean_k[at] = np.nan_to_num(np.nanmean(finite, axis=1), nan=-np.inf) if k else -np.inf
        neighbours[at, :top_ids.shape[1]] = top_ids
        pairs, pair_scores = _pairs_above(reader, query_ids, queries, top_ids, top_scores, threshold, kind)
        pair_parts.append(pairs)
        score_parts.append(pair_scores)
    if reader.generation() != generation:
        raise IndexChangedError("mi-index changed the index while it was being checked: run the check again")
    pairs = np.concatenate(pair_parts) if pair_parts else np.zeros((0, 2), np.int64)
    pair_scores = np.concatenate(score_parts) if score_parts else np.zeros(0, np.float32)
    if len(pairs):  # each pair once (found from both ends), first < second
        pairs = np.sort(pairs, axis=1)
        pairs, first = np.unique(pairs, axis=0, return_index=True)
        pair_scores = pair_scores[first]
    return Scan(ids, nearest, mean_k, neighbours, pairs, pair_scores, threshold, kind)


def _codes(values: list) -> np.ndarray:
    codes: dict = {}
    return np.asarray([codes.setdefault(v, len(codes)) for v in values], np.int64)


def _frames_margin(files: np.ndarray) -> int:
    """Extra candidates to fetch so that a frame of a multi-frame file still gets k neighbours
    of other files: the most frames one file has, capped (a 1000-frame cine costs what it costs)."""
    if not len(files):
        return 0
    return int(min(np.bincount(files).max() - 1, 64))


def _exact(reader, queries: np.ndarray, found: np.ndarray, valid: np.ndarray) -> np.ndarray:
    wanted = np.unique(found[valid])
    stored = reader.vectors(wanted.tolist())
    at = np.searchsorted(wanted, np.where(valid, found, wanted[0] if len(wanted) else 0))
    return np.einsum("bd,bkd->bk", queries, stored[at]) if len(wanted) else np.full(found.shape, -np.inf)


def _pairs_above(reader, query_ids, queries, top_ids, top_scores, threshold, kind):
    """(pairs, exact scores) of a batch at or above the threshold. An approximate index's
    scores (fp16) near the threshold are recomputed from the stored vectors."""
    margin = 0.0 if kind == "flat" else EXACT_RECHECK_MARGIN
    rows, cols = np.nonzero(top_scores >= threshold - margin)
    if not len(rows):
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    other = top_ids[rows, cols]
    scores = top_scores[rows, cols]
    if margin:
        wanted = np.unique(other)
        stored = reader.vectors(wanted.tolist())
        scores = np.einsum("pd,pd->p", queries[rows], stored[np.searchsorted(wanted, other)]).astype(np.float32)
    keep = scores >= threshold
    return np.stack([query_ids[rows][keep], other[keep]], axis=1), scores[keep]


class UnionFind:
    """Disjoint sets over positions 0..n-1 (path halving, union by size)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return int(x)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]

    def groups(self, members: np.ndarray) -> list[list[int]]:
        """The sets that hold two or more of `members` (positions), each sorted, largest first."""
        by_root: dict[int, list[int]] = {}
        for m in np.unique(members):
            by_root.setdefault(self.find(int(m)), []).append(int(m))
        return sorted((g for g in by_root.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def quantiles(values: np.ndarray) -> dict[str, float]:
    """A few quantiles of the finite values, for choosing a threshold from the data."""
    values = values[np.isfinite(values)]
    if not len(values):
        return {}
    points = {"min": 0.0, "p01": 0.01, "p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95,
              "p99": 0.99, "p999": 0.999, "max": 1.0}
    found = np.quantile(values.astype(np.float64), list(points.values()))
    return {name: round(float(v), 6) for name, v in zip(points, found)}


HISTOGRAM_EDGES = (-1.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0001)


def histogram(values: np.ndarray) -> list[dict[str, float | int]]:
    """Counts of the finite values in bins that are fine near 1 (where duplicates lie)."""
    values = values[np.isfinite(values)]
    counts, _ = np.histogram(values, bins=HISTOGRAM_EDGES)
    return [{"from": max(lo, -1.0), "to": min(hi, 1.0), "images": int(c)}
            for lo, hi, c in zip(HISTOGRAM_EDGES[:-1], HISTOGRAM_EDGES[1:], counts)]
