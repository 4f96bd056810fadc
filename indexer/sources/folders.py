"""Files and folders on disk as a source: `FolderSource`, and `walk`, which lists them."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..decode import sniff_kind
from ..errors import PathNotFoundError
from . import child_walks
from .base import Item
from .child_walks import ChildWalks, Job, listed_items, merged
from .folder_walk import WalkNotes, shares, tagged_batches

if TYPE_CHECKING:
    from ..store import IndexStore


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
        """Every file under the roots, walked here."""
        self._unreadable.clear()
        notes = WalkNotes(unreadable=self._unreadable)
        make = tuple.__new__  # Item(...) through its keyword-checking __new__ cost twice as much, per file
        for _segment, _folder, batch in tagged_batches(self.roots, self.skip, notes):
            # A folder's items made in one comprehension: a yield per file through two generators cost more
            yield from [make(Item, (path, st.st_size, st.st_mtime_ns)) for path, st in batch]
        self._refuse(notes.not_files)

    def compared(self, store: IndexStore, excluded: tuple[str, ...], compare: Callable[..., Any]) -> list | None:
        """The planning's comparison (`indexer.run.plan.compare`) done in child processes on Linux, one
        per core (at most 4), each walking a share of the roots and comparing it with the index's
        records of that share: their comparisons, to be joined; None where they cannot run (the
        caller lists and compares here). An
        unchanged re-run's planning over 100k files on 2 cores: 0.95-1.00 s with the index read here
        while children walked, 0.71-0.76 s compared in them."""
        if not child_walks.CHILD_WALKS or child_walks.WALKS < 2:
            return None
        self._unreadable.clear()
        resolved = [os.path.realpath(root) for root in self.roots]
        # A forked child holds a copy of every lock another thread held at the fork (SQLite's, its
        # connection pool's), never let go there: with other threads running, the children only walk
        # and the index is read here meanwhile.
        alone = threading.active_count() == 1
        job = Job(self.roots, self.skip, store, resolved, excluded, compare, self, nested=_nested(resolved),
                  read_index=alone)
        walks = ChildWalks.start(shares(self.roots, child_walks.WALKS), job)
        if walks is None:
            return None
        try:
            known = None if alone else store.files_under([Path(root) for root in resolved])
            parts = walks.compared()
            if parts is None:
                return None
            if not parts:  # a child sent its listing: all of them are merged and compared here
                listings = walks.listings()
                if listings is None:
                    return None
                keys, sizes, mtimes = merged(listings)
                if known is None:
                    known = {}
                    for listing in listings:
                        known.update(listing.records)
                self._add_elsewhere(store, resolved, keys, known)
                parts = [compare(listed_items(keys, sizes, mtimes, excluded), known, self)]
        finally:
            walks.stop()
        self._unreadable.extend(walks.notes.unreadable)
        self._refuse(walks.notes.not_files)
        return parts

    def known(self, store: IndexStore, listed: Sequence[str]) -> dict[str, tuple]:
        roots = [os.path.realpath(root) for root in self.roots]
        known = store.files_under([Path(root) for root in roots])
        self._add_elsewhere(store, roots, listed, known)
        return known

    @staticmethod
    def _add_elsewhere(store: IndexStore, roots: list[str], listed: Sequence[str], known: dict[str, tuple]) -> None:
        """Files reached through a symlinked folder live outside the roots: looked up one by one."""
        inside = tuple(root.rstrip(os.sep) + os.sep for root in roots)
        elsewhere = {key for key in listed if not key.startswith(inside)}
        known.update(store.files_at(sorted(elsewhere - known.keys())))

    def _refuse(self, not_files: list[str]) -> None:
        self.refused.extend((path, "not a regular file (a FIFO, device or socket)") for path in not_files)

    def accepts(self, item: Item) -> bool:
        return sniff_kind(Path(item.key)) is not None

    def sweepable(self, key: str) -> bool:
        return not key.startswith(tuple(folder.rstrip(os.sep) + os.sep for folder in self._unreadable))

    def read(self, item: Item) -> bytes:
        with open(item.key, "rb") as f:
            return f.read()


def _nested(roots: list[str]) -> bool:
    """Whether a root is given twice or lies under another (two shares would list its files). Sorted,
    a path follows the paths it lies under with only paths under them between."""
    folders = sorted(root.rstrip(os.sep) + os.sep for root in roots)
    return any(later.startswith(earlier) for earlier, later in zip(folders, folders[1:]))


def walk(roots: Sequence[Path], skip: Path | None = None, unreadable: list[str] | None = None,
         not_files: list[str] | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """(resolved path, stat) of every regular file under `roots` (folders walked recursively,
    files taken as they are). Hidden files and folders and the `skip` folder are left out;
    symlinked folders are followed once, so loops end. Folders that cannot be listed are
    appended to `unreadable` (resolved), so their known files are not taken for deleted.
    Roots that are neither folders nor regular files (a FIFO, a device: reading one could
    block forever) are appended to `not_files`."""
    notes = WalkNotes(unreadable=[] if unreadable is None else unreadable,
                      not_files=[] if not_files is None else not_files)
    for _segment, _folder, batch in tagged_batches(roots, skip, notes):
        yield from batch
