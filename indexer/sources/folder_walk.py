"""Walking folders: every regular file under some roots with its stat, folder by folder, and the
shares several walks split the roots into (byte ranges of resolved paths)."""
from __future__ import annotations

import logging
import operator
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PathNotFoundError
from ..path_ranges import path_prefix, prefix_end

log = logging.getLogger(__name__)
_name = operator.attrgetter("name")

# POSIX: a folder is listed through a descriptor, so that each entry is stat'ed relative to it (fstatat) instead of
# by its full path, which the kernel walks again component by component: a tenth of the stat calls' time.
_BY_DESCRIPTOR = os.scandir in os.supports_fd and hasattr(os, "O_DIRECTORY")
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)  # O_DIRECTORY: a FIFO put there is refused, not opened

Segment = tuple[int, str]  # (the root's position, the name of the root's subfolder a folder is in; "": the root's own)
Batch = tuple[Segment, "tuple[int, int] | None", "list[tuple[str, os.stat_result]]"]


def warn_unreadable(folder: str, why: str) -> None:
    log.warning("cannot read folder %s: %s", folder, why)


@dataclass
class WalkNotes:
    """What a walk met besides files: folders it could not read (resolved) and why, roots that are
    neither folders nor regular files, and whether it followed a symlink (a file reached through one
    has a path outside the share that listed it)."""

    unreadable: list[str] = field(default_factory=list)
    not_files: list[str] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    linked: bool = False
    warn: Callable[[str, str], None] | None = warn_unreadable  # None: kept in `warnings` (a child logs nothing)

    def unreadable_folder(self, folder: str, why: str) -> None:
        if self.warn is None:
            self.warnings.append((folder, why))
        else:
            self.warn(folder, why)


@dataclass(frozen=True)
class Share:
    """Walk `number`'s part of the roots when several walks split them. Of each folder root: the
    entries whose key (the resolved path, a folder's with its '/') lies in [low, high), so that
    what a share lists and the index's records of the same byte range are the same files; roots
    that are files go to share 0. The bounds come from one listing of each root made before the
    walks start: walks that list a root at other moments still take every entry exactly once."""

    number: int
    ranges: tuple[tuple[bytes, bytes] | None, ...]  # per root position; None: a root that is not a folder

    def entries(self, position: int, prefix: bytes, entries: list[os.DirEntry]) -> tuple[list[os.DirEntry], set[str]]:
        """Of a folder's `entries` (the folder's resolved path + '/' is `prefix`), those the share
        takes: a file (or link) whose path is in its range, a folder whose paths are all or partly
        in it; and the names of the folders only partly in it (their entries are taken one by one)."""
        low, high = self.ranges[position]
        taken, partly = [], set()
        for entry in entries:
            key = prefix + os.fsencode(entry.name)
            if not entry.is_dir(follow_symlinks=False):
                if low <= key < high:
                    taken.append(entry)
                continue
            start = key + b"/"
            end = prefix_end(start)
            if start < high and end > low:
                taken.append(entry)
                if start < low or end > high:
                    partly.add(entry.name)
        return taken, partly


def shares(roots: Sequence[Path], parts: int) -> list[Share]:
    """`parts` shares of `roots`, each folder root cut by the names of its entries into ranges that
    hold about as many entries each (a subfolder counts as one). A root with few entries (an archive
    of `CR/`, `CT/` and `MR/`) is cut by its subfolders' entries instead."""
    cuts: list[tuple[bytes, ...] | None] = []
    for root in roots:
        root = Path(root).expanduser()
        if not root.is_dir():
            cuts.append(None)
            continue
        prefix = path_prefix(os.path.realpath(root))
        keys = _entry_keys(root, prefix)
        if len(keys) < 4 * parts:
            keys = sorted(finer for key in keys for finer in (
                _entry_keys(root / os.fsdecode(key[len(prefix):-1]), key) or [key] if key.endswith(b"/") else [key]))
        # bounds among the keys that are UTF-8: a text path is compared with a bound as text
        bounds = [key for key in keys if _is_utf8(key)]
        inner = [bounds[len(bounds) * number // parts] if bounds else prefix for number in range(1, parts)]
        cuts.append((prefix, *inner, prefix_end(prefix)))
    return [Share(number, tuple(None if cut is None else (cut[number], cut[number + 1]) for cut in cuts))
            for number in range(parts)]


def _entry_keys(folder: Path, prefix: bytes) -> list[bytes]:
    """The sorted keys (resolved path, a folder's with its '/') of a folder's entries, hidden ones left out."""
    try:
        with os.scandir(folder) as entries:
            return sorted(prefix + os.fsencode(entry.name) + (b"/" if entry.is_dir(follow_symlinks=False) else b"")
                          for entry in entries if entry.name[0] != ".")
    except OSError:
        return []


def _is_utf8(key: bytes) -> bool:
    try:
        key.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def tagged_batches(roots: Sequence[Path], skip: Path | None, notes: WalkNotes, share: Share | None = None,
                   ) -> Iterator[Batch]:
    """The files under `roots` (resolved path, stat), a list per folder (a root that is a file: a
    list of one), each with its segment and its folder's (st_dev, st_ino) (None for a root that is a
    file); only `share`'s part when given. Hidden files and folders and the `skip` folder are left
    out; symlinked folders are followed once, so loops end."""
    seen_dirs: set[tuple[int, int]] = set()
    for position, root in enumerate(roots):
        root = Path(root).expanduser()
        if not root.exists():
            raise PathNotFoundError(f"no such file or folder: {root}")
        if not root.is_dir():
            if share is not None and share.number:
                continue
            st = root.stat()
            if stat.S_ISREG(st.st_mode):
                yield (position, ""), None, [(os.path.realpath(root), st)]
            else:
                notes.not_files.append(str(root))
            continue
        # Each folder is carried with its resolved path: a name in it resolves to that path joined
        # with the name unless the entry is itself a symlink (then realpath, once per link). One
        # realpath per file was 3.6 of the 4.4 s of an unchanged run over 100k files.
        # (path, resolved path, segment, whether the share takes the folder only in part)
        stack: list[tuple[str, str, Segment | None, bool]] = [(str(root), os.path.realpath(root), None,
                                                               share is not None)]
        while stack:
            folder, resolved, segment, in_part = stack.pop()
            fd = None
            try:
                if _BY_DESCRIPTOR:
                    fd = os.open(folder, _FOLDER_FLAGS)
                st = os.stat(folder) if fd is None else os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen_dirs or (skip is not None and Path(resolved) == skip):
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                entries = sorted(os.scandir(folder if fd is None else fd), key=_name, reverse=True)
                partly: set[str] = set()
                if in_part:  # the root, or a folder the share's range cuts through: only the share's entries
                    entries, partly = share.entries(position, path_prefix(resolved), entries)
                pushed = len(stack)
                # while fd is open: the stat calls are relative to it
                files = _listed(folder, resolved, entries, stack, notes)
            except OSError as e:
                if segment is not None or share is None or share.number == 0:  # a root: said by share 0 only
                    notes.unreadable_folder(folder, e.strerror)
                notes.unreadable.append(resolved)
                continue
            finally:
                if fd is not None:
                    os.close(fd)
            if segment is None:  # the root: its subfolders are the segments
                stack[pushed:] = [(path, real, (position, os.path.basename(path)), os.path.basename(path) in partly)
                                  for path, real, *_ in stack[pushed:]]
                segment = (position, "")
            else:
                stack[pushed:] = [(path, real, segment, os.path.basename(path) in partly)
                                  for path, real, *_ in stack[pushed:]]
            if files:
                yield segment, (st.st_dev, st.st_ino), files


def _listed(folder: str, resolved: str, entries: list[os.DirEntry], stack: list[tuple[str, str, Any, bool]],
            notes: WalkNotes) -> list[tuple[str, os.stat_result]]:
    """(resolved path, stat) of the files among one folder's `entries`, in their order; its
    subfolders (and symlinked folders) pushed on `stack` as (path, resolved path, None, False)."""
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
                notes.linked |= link
                stack.append((os.path.join(folder, name), os.path.realpath(prefix + name) if link else prefix + name,
                              None, False))
            elif entry.is_file():
                notes.linked |= link
                add((os.path.realpath(prefix + name) if link else prefix + name, entry.stat()))
        except OSError:
            continue  # a dangling link or a file gone meanwhile
    return files
