"""Files and folders on disk as a source: `FolderSource`, and `walk`, which lists them."""
from __future__ import annotations

import logging
import operator
import os
import pickle
import signal
import stat
import sys
import weakref
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
        """Every file under the roots. On Linux the walk starts at once, in child processes (one per
        core, at most 4, each taking a share of each root's subfolders), so that the caller can read
        the index's records meanwhile (`indexer.run.plan`): an unchanged re-run's planning over 100k
        files on 2 cores took 1.42-1.46 s walking first, 1.07-1.11 s with one child, 0.96-0.99 s with two."""
        self._unreadable.clear()
        return self._collect(_ChildWalk.start(self.roots, self.skip) if _CHILD_WALK else None)

    def _collect(self, child: _ChildWalk | None) -> Iterator[Item]:
        make = tuple.__new__  # Item(...) through its keyword-checking __new__ cost twice as much, per file
        walked = child.result() if child is not None else None
        if walked is None:  # walked here: no child, or it failed (the error, if any, comes again here)
            not_files: list[str] = []
            for batch in _folder_batches(self.roots, self.skip, self._unreadable, not_files):
                # A folder's items made in one comprehension: a yield per file through two generators cost more
                yield from [make(Item, (path, st.st_size, st.st_mtime_ns)) for path, st in batch]
        else:
            paths, sizes, mtimes, unreadable, not_files = walked
            self._unreadable.extend(unreadable)
            yield from [make(Item, item) for item in zip(paths, sizes, mtimes)]
        self.refused.extend((path, "not a regular file (a FIFO, device or socket)") for path in not_files)

    def known(self, store: IndexStore, listed: Sequence[str]) -> dict[str, tuple]:
        roots = [os.path.realpath(root) for root in self.roots]
        known = store.files_under([Path(root) for root in roots])
        # files reached through a symlinked folder live outside the roots: look them up one by one
        inside = tuple(root.rstrip(os.sep) + os.sep for root in roots)
        elsewhere = {key for key in listed if not key.startswith(inside)}
        known.update(store.files_at(sorted(elsewhere - known.keys())))
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


def _warn_unreadable(folder: str, why: str) -> None:
    log.warning("cannot read folder %s: %s", folder, why)


def _folder_batches(roots: Sequence[Path], skip: Path | None, unreadable: list[str] | None,
                    not_files: list[str] | None, warn: Callable[[str, str], None] = _warn_unreadable,
                    ) -> Iterator[list[tuple[str, os.stat_result]]]:
    """`walk`'s files, a list per folder (a root that is a file: a list of one); `warn(folder,
    reason)` for each folder that cannot be read."""
    for _segment, _folder, files in _tagged_batches(roots, skip, unreadable, not_files, warn):
        yield files


Segment = tuple[int, str]  # (the root's position, the name of the root's subfolder a folder is in; "": the root's own)


def _tagged_batches(roots: Sequence[Path], skip: Path | None, unreadable: list[str] | None,
                    not_files: list[str] | None, warn: Callable[[str, str], None] = _warn_unreadable,
                    part: tuple[int, int] = (0, 1),
                    ) -> Iterator[tuple[Segment, tuple[int, int] | None, list[tuple[str, os.stat_result]]]]:
    """`_folder_batches`'s lists, each with its segment and its folder's (st_dev, st_ino) (None for a
    root that is a file). `part` (i, n): only the segments whose subfolder's name falls to part i of n
    (the roots' own files and the roots that are files: part 0), for n walks that split one between
    them. The split goes by name, not by place in a listing: walks that list a root at different
    moments agree on who takes each subfolder."""
    index, parts = part
    seen_dirs: set[tuple[int, int]] = set()
    for position, root in enumerate(roots):
        root = Path(root).expanduser()
        if not root.exists():
            raise PathNotFoundError(f"no such file or folder: {root}")
        if not root.is_dir():
            if index:
                continue
            st = root.stat()
            if stat.S_ISREG(st.st_mode):
                yield (position, ""), None, [(os.path.realpath(root), st)]
            elif not_files is not None:
                not_files.append(str(root))
            continue
        # Each folder is carried with its resolved path: a name in it resolves to that path joined
        # with the name unless the entry is itself a symlink (then realpath, once per link). One
        # realpath per file was 3.6 of the 4.4 s of an unchanged run over 100k files.
        stack: list[tuple[str, str, Segment | None]] = [(str(root), os.path.realpath(root), None)]
        while stack:
            folder, resolved, segment = stack.pop()
            fd = None
            try:
                if _BY_DESCRIPTOR:
                    fd = os.open(folder, _FOLDER_FLAGS)
                st = os.stat(folder) if fd is None else os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen_dirs or (skip is not None and Path(resolved) == skip):
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                entries = sorted(os.scandir(folder if fd is None else fd), key=_name, reverse=True)
                pushed = len(stack)
                # while fd is open: the stat calls are relative to it
                files = _listed(folder, resolved, entries, stack, with_files=segment is not None or not index)
            except OSError as e:
                if segment is not None or not index:  # a root that cannot be read: said by part 0 only
                    warn(folder, e.strerror)
                if unreadable is not None:
                    unreadable.append(resolved)
                continue
            finally:
                if fd is not None:
                    os.close(fd)
            if segment is None:  # the root: its subfolders are the segments, shared out by name
                below = [(path, real, (position, os.path.basename(path))) for path, real, _ in stack[pushed:]]
                stack[pushed:] = [entry for entry in below if parts == 1 or _part_of(entry[2][1], parts) == index]
                segment = (position, "")
            else:
                stack[pushed:] = [(path, real, segment) for path, real, _ in stack[pushed:]]
            if files:
                yield segment, (st.st_dev, st.st_ino), files


def _part_of(name: str, parts: int) -> int:
    return zlib.crc32(os.fsencode(name)) % parts


def _listed(folder: str, resolved: str, entries: list[os.DirEntry], stack: list[tuple[str, str, Any]],
            with_files: bool = True) -> list[tuple[str, os.stat_result]]:
    """(resolved path, stat) of the files among one folder's `entries`, in their order (none, and
    nothing stat'ed, unless `with_files`); its subfolders (and symlinked folders) pushed on `stack` as
    (path, resolved path, None)."""
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
                if with_files:
                    add((prefix + name, entry.stat(follow_symlinks=False)))
                continue
            link = entry.is_symlink()
            if entry.is_dir():
                stack.append((os.path.join(folder, name), os.path.realpath(prefix + name) if link else prefix + name,
                              None))
            elif with_files and entry.is_file():
                add((os.path.realpath(prefix + name) if link else prefix + name, entry.stat()))
        except OSError:
            continue  # a dangling link or a file gone meanwhile
    return files


# A fork is cheap on Linux (the pages are shared until written); macOS forbids much in a forked child
# of a process with threads.
_CHILD_WALK = sys.platform.startswith("linux")
# Walks in parallel: the cores this process may use, at most 4 (each stats its part of the files).
_WALKS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class _ChildWalk:
    """`_tagged_batches` run in forked child processes, one part of the roots' subfolders each, their
    results sent back whole through pipes: the paths as one NUL-separated string, sizes and times as
    int64 arrays (2 ms to take back per 100k files), and each folder's place, put back in the order of
    one walk here (a folder reached by two parts, through a link, kept where that walk would list it).
    A child only lists and stats: it logs nothing (a logging lock another thread held at the fork would
    never be let go there), and ends with os._exit. Whatever goes wrong with one (it cannot start, it
    fails, it is killed) leaves `result()` None: the caller walks itself."""

    def __init__(self, children: list[tuple[int, int]]):
        self.children = children  # (pid, read end of its pipe)
        # a walk never taken (the listing dropped unread) must not leave its children waiting to write
        self._stop = weakref.finalize(self, _stop_children, list(children))

    @classmethod
    def start(cls, roots: Sequence[Path], skip: Path | None) -> _ChildWalk | None:
        parts = _WALKS
        children: list[tuple[int, int]] = []
        for index in range(parts):
            read_end, write_end = os.pipe()
            try:
                pid = os.fork()
            except OSError:  # no memory or processes left for it
                os.close(read_end)
                os.close(write_end)
                _stop_children(children)
                return None
            if pid == 0:  # the child
                try:
                    os.close(read_end)
                    for _, other in children:
                        os.close(other)
                    try:  # Ctrl-C ends it at once, not through a handler of the parent's
                        signal.signal(signal.SIGINT, signal.SIG_DFL)
                    except ValueError:
                        pass
                    _send_walk(write_end, roots, skip, (index, parts))
                finally:
                    os._exit(0)
            os.close(write_end)
            children.append((pid, read_end))
        return cls(children)

    @property
    def pids(self) -> list[int]:
        return [pid for pid, _ in self.children]

    def result(self) -> tuple[list[str], array, array, list[str], list[str]] | None:
        """(paths, sizes, mtimes, unreadable folders, roots that are not files), once the children are done."""
        self._stop.detach()
        received = []
        try:
            for number, (pid, pipe) in enumerate(self.children):
                chunks = []
                with open(pipe, "rb") as stream:
                    while chunk := stream.read(1 << 20):
                        chunks.append(chunk)
                os.waitpid(pid, 0)  # it has closed its end: done, or dead
                received.append(b"".join(chunks))
        except BaseException:  # interrupted while they walk
            _stop_children(self.children[number:], closed=1)
            raise
        try:
            parts = [pickle.loads(message) for message in received]
        except Exception:  # nothing or part of it came: a child failed or was killed
            return None
        return _merged(parts)


def _merged(parts: list[tuple]) -> tuple[list[str], array, array, list[str], list[str]]:
    """The parts' listings as one walk here gives them: segments in its order (root by root, the root's
    own files, then its subfolders by name), a folder listed by two parts kept at its first place."""
    pieces = []
    for number, (_paths, _sizes, _mtimes, batches, *_rest) in enumerate(parts):
        offset = 0
        for order, (segment, folder, count) in enumerate(batches):
            pieces.append((segment, number, order, folder, offset, count))  # "", a root's own, sorts first
            offset += count
    pieces.sort(key=lambda piece: piece[:3])
    columns = [(paths.split("\0") if paths else [], sizes, mtimes) for paths, sizes, mtimes, *_ in parts]
    keys: list[str] = []
    sizes_of, mtimes_of = array("q"), array("q")
    seen: set[tuple[int, int]] = set()
    for _segment, number, _order, folder, offset, count in pieces:
        if folder is not None:
            if folder in seen:
                continue
            seen.add(folder)
        paths, sizes, mtimes = columns[number]
        keys.extend(paths[offset:offset + count])
        sizes_of.frombytes(sizes[offset * 8:(offset + count) * 8])
        mtimes_of.frombytes(mtimes[offset * 8:(offset + count) * 8])
    unreadable = list(dict.fromkeys(folder for part in parts for folder in part[4]))
    not_files = [root for part in parts for root in part[5]]
    for folder, why in dict.fromkeys(warning for part in parts for warning in part[6]):
        _warn_unreadable(folder, why)
    return keys, sizes_of, mtimes_of, unreadable, not_files


def _stop_children(children: list[tuple[int, int]], closed: int = 0) -> None:
    """Kill and reap `children`; their pipes closed here but for the first `closed` (closed already)."""
    for number, (pid, pipe) in enumerate(children):
        if number >= closed:
            try:
                os.close(pipe)
            except OSError:
                pass
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _send_walk(pipe: int, roots: Sequence[Path], skip: Path | None, part: tuple[int, int]) -> None:
    paths: list[str] = []
    sizes, mtimes = array("q"), array("q")
    batches: list[tuple[Segment, tuple[int, int] | None, int]] = []
    unreadable: list[str] = []
    not_files: list[str] = []
    warnings: list[tuple[str, str]] = []
    for segment, folder, files in _tagged_batches(roots, skip, unreadable, not_files,
                                                  lambda folder, why: warnings.append((folder, why)), part):
        batches.append((segment, folder, len(files)))
        for path, st in files:
            paths.append(path)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
    message = pickle.dumps(("\0".join(paths), sizes.tobytes(), mtimes.tobytes(), batches, unreadable, not_files,
                            warnings), protocol=pickle.HIGHEST_PROTOCOL)
    with open(pipe, "wb") as f:
        f.write(message)
