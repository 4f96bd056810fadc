"""The records of finished files -> the index: held until enough wait (COMMIT_EVERY) or until
asked (a batch encoded, the run's end), then written in one transaction."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..store import IndexStore

COMMIT_EVERY = 256  # files skipped or reused between commits when nothing is being encoded


class Committer:
    """Files indexed and skipped, waiting for their transaction."""

    def __init__(self, store: IndexStore):
        self.store = store
        self.indexed: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.seconds = 0.0

    def commit(self, force: bool) -> None:
        """Write what waits: always when `force`, else once COMMIT_EVERY files wait."""
        pending = len(self.indexed) + len(self.skipped)
        if pending and (force or pending >= COMMIT_EVERY):
            start = time.perf_counter()
            self.store.commit(indexed=self.indexed, skipped=self.skipped)
            self.seconds += time.perf_counter() - start
            self.indexed, self.skipped = [], []
