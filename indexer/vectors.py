"""Vectors -> FAISS index, and id-filtered top-k search over it.

The FAISS index is a cache of the embeddings stored in SQLite; ids are SQLite row ids.
"""
from __future__ import annotations

import faiss
import numpy as np


def build_faiss_index(vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """An inner-product index over L2-normalised `vectors` (N, D) with int64 `ids`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    if len(vectors):
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids), each (Q, k); ids -1 where fewer than k exist. `allowed_ids` restricts
    the search before the cut, so k filtered hits come back when k exist."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    params = None
    if allowed_ids is not None:
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64)))
    return index.search(queries, k, params=params)
