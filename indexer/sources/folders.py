"""Files and folders on disk as a source: `FolderSource`, and `walk`, which lists them."""
from __future__ import annotations

import logging
import operator
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..decode import sniff_kind
from ..errors import PathNotFoundError
from .base import Item

if TYPE_CHECKING:
    from ..store import IndexStore

log = logging.getLogger(__name__)
_name = operator.attrgetter("name")


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
        make = tuple.__new__  # Item(...) through its keyword-checking __new__ cost twice as much, per file
        for batch in _folder_batches(self.roots, self.skip, self._unreadable, not_files):
            # A folder's items made in one comprehension: a yield per file through two generators cost more
            yield from [make(Item, (path, st.st_size, st.st_mtime_ns)) for path, st in batch]
        self.refused.extend((path, "not a regular file (a FIFO, device or socket)") for path in not_files)

    def known(self, store: IndexStore, listed: Sequence[str]) -> dict[str, tuple]:
        known = store.files_under([Path(os.path.realpath(root)) for root in self.roots])
        # files reached through a symlinked folder live outside the roots: look them up one by one
        known.update(store.files_at(sorted(set(listed) - known.keys())))
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
    for batch in _folder_batches(roots, skip, unreadable, not_files):
        yield from batch


# POSIX: a folder is listed through a descriptor, so that each entry is stat'ed relative to it (fstatat) instead of
# by its full path, which the kernel walks again component by component: a tenth of the stat calls' time.
_BY_DESCRIPTOR = os.scandir in os.supports_fd and hasattr(os, "O_DIRECTORY")
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)  # O_DIRECTORY: a FIFO put there is refused, not opened


def _folder_batches(roots: Sequence[Path], skip: Path | None, unreadable: list[str] | None,
                    not_files: list[str] | None) -> Iterator[list[tuple[str, os.stat_result]]]:
    """`walk`'s files, a list per folder (a root that is a file: a list of one)."""
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        root = Path(root).expanduser()
        if not root.exists():
            raise PathNotFoundError(f"no such file or folder: {root}")
        if not root.is_dir():
            st = root.stat()
            if stat.S_ISREG(st.st_mode):
                yield [(os.path.realpath(root), st)]
            elif not_files is not None:
                not_files.append(str(root))
            continue
        # Each folder is carried with its resolved path: a name in it resolves to that path joined
        # with the name unless the entry is itself a symlink (then realpath, once per link). One
        # realpath per file was 3.6 of the 4.4 s of an unchanged run over 100k files.
        stack = [(str(root), os.path.realpath(root))]
        while stack:
            folder, resolved = stack.pop()
            fd = None
            try:
                if _BY_DESCRIPTOR:
                    fd = os.open(folder, _FOLDER_FLAGS)
                st = os.stat(folder) if fd is None else os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen_dirs or (skip is not None and Path(resolved) == skip):
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                entries = sorted(os.scandir(folder if fd is None else fd), key=_name, reverse=True)
                files = _listed(folder, resolved, entries, stack)  # while fd is open: the stat calls are relative to it
            except OSError as e:
                log.warning("cannot read folder %s: %s", folder, e.strerror)
                if unreadable is not None:
                    unreadable.append(resolved)
                continue
            finally:
                if fd is not None:
                    os.close(fd)
            yield files


def _listed(folder: str, resolved: str, entries: list[os.DirEntry], stack: list[tuple[str, str]]
            ) -> list[tuple[str, os.stat_result]]:
    """(resolved path, stat) of the files among one folder's `entries`, in their order; its
    subfolders (and symlinked folders) pushed on `stack` as (path, resolved path)."""
    prefix = resolved.rstrip(os.sep) + os.sep  # joined by hand: os.path.join cost more than a stat
    files = []
    add = files.append
    for entry in entries:
        name = entry.name
        if name[0] == ".":
            continue
        try:
            # A plain file first, asked of the folder listing's file type: one call, not three
            if entry.is_file(follow_symlinks=False):
                add((prefix + name, entry.stat(follow_symlinks=False)))
                continue
            link = entry.is_symlink()
            if entry.is_dir():
                stack.append((os.path.join(folder, name), os.path.realpath(prefix + name) if link else prefix + name))
            elif entry.is_file():
                add((os.path.realpath(prefix + name) if link else prefix + name, entry.stat()))
        except OSError:
            continue  # a dangling link or a file gone meanwhile
    return files
