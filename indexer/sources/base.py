"""Where images come from: a source lists items (a key, a version token, a way to read the
bytes), and the pipeline decides from the index what is new, changed, unchanged or gone.

This is the seam for other sources than folders (a PACS over DICOMweb, object storage): a
source implements the small `Source` protocol below; decoding, encoding and writing are the
same for all of them.

- `Item.key` is what the index's `files.path` column holds: a resolved file path for folders;
  for a PACS, say, a URL naming the instance. Keys are unique within one index.
- `(Item.size, Item.mtime_ns)` is the version token, compared exactly with the index's record:
  equal means unchanged (the item is not read again). A source without sizes or times puts any
  stable values there, such as 0 and a hash of what identifies a version.
"""
from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from ..store import IndexStore


class Item(NamedTuple):
    """One thing a source holds, as the pipeline and the index know it (a named tuple: a walk
    makes one per file, and a frozen dataclass cost 7 times as much to make, 0.4 s per 100k)."""

    key: str
    size: int
    mtime_ns: int


class Source(Protocol):
    """What the pipeline needs of a source. `read` runs in decoding worker processes, so a
    source must pickle (hold names and settings, not open connections). A source may also have
    `compared(store, excluded, compare)`: planning's comparison of its listing with the index
    done its own way (a folder source: in child processes, a share of the roots each), as
    comparisons of disjoint parts, or None to have it listed and compared by the planner."""

    name: str                          # for messages: the folders, the server
    refused: list[tuple[str, str]]     # (key, reason) met while listing: reported, never stored

    def items(self) -> Iterator[Item]:
        """Every item the source holds now."""

    def known(self, store: IndexStore, listed: Sequence[str]) -> dict[str, tuple]:
        """The index's records ({key: (size, mtime_ns, error, retry)}) of the keys this source
        covers, and of `listed` keys it lists from elsewhere."""

    def accepts(self, item: Item) -> bool:
        """Whether a new or changed item is something to index (asked only for those)."""

    def sweepable(self, key: str) -> bool:
        """Whether a known key that was not listed now is gone (False where listing failed)."""

    def read(self, item: Item) -> bytes:
        """The item's bytes (OSError when it cannot be read)."""


class BoundedRetrievals:
    """For a network source: at most `connections` retrievals in flight (`with self._slots:`),
    across the decoding processes started from here (a multiprocessing semaphore, inherited by
    them). Pickled for elsewhere (a Ray task) it cannot travel; there the bound holds per process.
    Call `_bound_retrievals()` from `__post_init__`."""

    connections: int

    def _bound_retrievals(self) -> None:
        self.connections = max(1, int(self.connections))
        self._slots = multiprocessing.get_context().BoundedSemaphore(self.connections)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if multiprocessing.context.get_spawning_popen() is None:  # not for a process started here
            state["_slots"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._slots is None:
            self._slots = threading.BoundedSemaphore(self.connections)
