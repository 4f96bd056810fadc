"""A running Searcher's view of the vectors: the FAISS index it loaded (the base) plus what mi-index
changed since (the delta: rows added, searched exactly from the stored vectors, and rows
removed, left out by a selector), so that one added image is searchable in milliseconds, not after
re-reading a FAISS file of gigabytes. Ids only grow, so the rows added are those above the base's
largest id (see indexer.store.faiss_cache: the writer keeps the FAISS file for small changes)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

@dataclass(frozen=True)
class LiveIndex:
    """One generation's searchable state; immutable (a search holds it without a lock)."""

    base: Any                 # the FAISS index loaded
    gpu: Any                  # its GPU copy, or base
    generation: int
    file_name: str | None     # the cache file the base was read from (a rewrite means: reload)
    base_ids: np.ndarray      # the base's ids, sorted
    new_ids: np.ndarray       # rows added since the base
    delta: Any                # an exact (flat) FAISS index of those rows, or None
    gone: np.ndarray | None   # base ids removed since, or None

    @classmethod
    def of(cls, base: Any, gpu: Any, generation: int, file_name: str | None) -> LiveIndex:
        from indexer.store.faiss_cache import _faiss_ids

        return cls(base, gpu, generation, file_name, np.sort(_faiss_ids(base)), np.zeros(0, np.int64), None, None)

    def updated(self, store: Any) -> LiveIndex | None:
        """This base with the delta of the store's current state; None when a full reload is due: the
        writer rewrote the file, or the delta outgrew what the writer ever leaves as one (its rule,
        indexer.store.faiss_cache: DELTA_MAX_ROWS added, DELTA_MAX_REMOVED of the file removed)."""
        from indexer.store.faiss_cache import DELTA_MAX_REMOVED, DELTA_MAX_ROWS

        if store.faiss_file_name() != self.file_name:
            return None
        largest = int(self.base_ids[-1]) if len(self.base_ids) else -1
        generation, new_ids, new_vectors, held = store.faiss_delta(largest, len(self.base_ids))
        gone = None if held is None else np.setdiff1d(self.base_ids, held, assume_unique=True)
        removed = 0 if gone is None else len(gone)
        if len(new_ids) > DELTA_MAX_ROWS or removed > DELTA_MAX_REMOVED * len(self.base_ids) \
                or new_vectors.shape[1] != self.base.d:
            return None
        from indexer.store import vectors

        delta = vectors.build_faiss_index(new_vectors, new_ids, kind="flat") if len(new_ids) else None
        return replace(self, generation=generation, new_ids=new_ids, delta=delta,
                       gone=gone if gone is not None and len(gone) else None)

    def search(self, queries: np.ndarray, k: int, allowed: Any, coarse_factor: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (1, <= k) of one query over base and delta, best first; `allowed`: the ids a
        filter allows (an array or an indexer.store.vectors.Allowed), or None."""
        from indexer.store import vectors

        fetch = k * coarse_factor
        scores, ids = vectors.search(self.base, queries, fetch, allowed, excluded_ids=self.gone,
                                     gpu=self.gpu if self.gpu is not self.base and self.gone is None else None)
        if self.delta is None:
            return scores, ids
        delta_scores, delta_ids = vectors.search(self.delta, queries, fetch, allowed)  # exact
        all_scores = np.concatenate([scores[0], delta_scores[0]])
        all_ids = np.concatenate([ids[0], delta_ids[0]])
        keep = all_ids >= 0
        all_scores, all_ids = all_scores[keep], all_ids[keep]
        order = np.argsort(-all_scores, kind="stable")[:fetch]
        return all_scores[order][None], all_ids[order][None]
