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

import logging
import multiprocessing
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..decode import sniff_kind
from ..errors import PathNotFoundError

if TYPE_CHECKING:
    from ..store import IndexStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One thing a source holds, as the pipeline and the index know it."""

    key: str
    size: int
    mtime_ns: int


class Source(Protocol):
    """What the pipeline needs of a source. `read` runs in decoding worker processes, so a
    source must pickle (hold names and settings, not open connections)."""

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


@dataclass
class FolderSource:
    """Files and folders on disk: folders walked recursively; hidden files and folders and the
    index's own folder left out; symlinked folders followed once (loops end); a folder that
    cannot be listed does not make its known files look deleted; a root that is not a regular
    file or folder (a FIFO, a device: reading one could block forever) is refused."""

    roots: Sequence[Path]
    skip: Path | None = None
    refused: list[tuple[str, str]] = field(default_factory=list)
    _unreadable: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.roots = [Path(root).expanduser() for root in self.roots]
        for root in self.roots:
            if not root.exists():
                raise PathNotFoundError(f"no such file or folder: {root}")

    @property
    def name(self) -> str:
        return ", ".join(map(str, self.roots))

    def items(self) -> Iterator[Item]:
        self._unreadable.clear()
        not_files: list[str] = []
        for path, st in walk(self.roots, self.skip, self._unreadable, not_files):
            yield Item(path, st.st_size, st.st_mtime_ns)
        self.refused.extend((path, "not a regular file (a FIFO, device or socket)") for path in not_files)

    def known(self, store: IndexStore, listed: Sequence[str]) -> dict[str, tuple]:
        known = store.files_under([Path(os.path.realpath(root)) for root in self.roots])
        # files reached through a symlinked folder live outside the roots: look them up one by one
        known.update(store.files_at([key for key in listed if key not in known]))
        return known

    def accepts(self, item: Item) -> bool:
        return sniff_kind(Path(item.key)) is not None

    def sweepable(self, key: str) -> bool:
        return not key.startswith(tuple(folder.rstrip(os.sep) + os.sep for folder in self._unreadable))

    def read(self, item: Item) -> bytes:
        with open(item.key, "rb") as f:
            return f.read()


def walk(roots: Sequence[Path], skip: Path | None = None, unreadable: list[str] | None = None,
         not_files: list[str] | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """(resolved path, stat) of every regular file under `roots` (folders walked recursively,
    files taken as they are). Hidden files and folders and the `skip` folder are left out;
    symlinked folders are followed once, so loops end. Folders that cannot be listed are
    appended to `unreadable` (resolved), so their known files are not taken for deleted.
    Roots that are neither folders nor regular files (a FIFO, a device: reading one could
    block forever) are appended to `not_files`."""
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        root = Path(root).expanduser()
        if not root.exists():
            raise PathNotFoundError(f"no such file or folder: {root}")
        if not root.is_dir():
            st = root.stat()
            if stat.S_ISREG(st.st_mode):
                yield os.path.realpath(root), st
            elif not_files is not None:
                not_files.append(str(root))
            continue
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = folder.stat()
                if (st.st_dev, st.st_ino) in seen_dirs or (skip is not None and folder.resolve() == skip):
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
            except OSError as e:
                log.warning("cannot read folder %s: %s", folder, e.strerror)
                if unreadable is not None:
                    unreadable.append(os.path.realpath(folder))
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir():
                        stack.append(Path(entry.path))
                    elif entry.is_file():
                        yield os.path.realpath(entry.path), entry.stat()
                except OSError:
                    continue  # a dangling link or a file gone meanwhile


