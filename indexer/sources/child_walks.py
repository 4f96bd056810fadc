"""A folder source's planning in forked child processes: each walks its share of the roots, reads
the index's records of the same share through a connection of its own, and compares the two, so
that only what differs comes back (an unchanged re-run over 100k files: a count and two empty
lists per child). A child that met a symlink (its files may lie in another's share) sends its whole
listing and records instead, and the others are asked for theirs: the caller then merges them into
one walk's listing and compares that."""
from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Item
from .folder_walk import Share, WalkNotes, tagged_batches, warn_unreadable

if TYPE_CHECKING:
    from ..store import IndexStore

# A fork is cheap on Linux (the pages are shared until written); macOS forbids much in a forked child
# of a process with threads.
CHILD_WALKS = sys.platform.startswith("linux")
# Walks in parallel: the cores this process may use, at most 4 (each stats its share of the files).
WALKS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))

_LENGTH = struct.Struct("<Q")
_SEND_LISTING = b"L"


@dataclass
class Job:
    """What each child does: walk `roots` (its share), and if `read_index`, read `store`'s records of
    the share and (unless the roots are `nested` or it met a link) `compare(items, records, source)`
    with the items under `excluded` left out; else send its listing."""

    roots: Sequence[Path]
    skip: Path | None
    store: IndexStore
    root_keys: list[str]           # the roots themselves, resolved: their own records (share 0 reads them)
    excluded: tuple[str, ...]
    compare: Callable[[list[Item], dict[str, tuple], Any], Any]
    source: Any
    nested: bool                   # roots at or under one another: two shares may list the same files
    read_index: bool               # False: the children only walk (the parent reads the records)


@dataclass
class Listing:
    """One child's whole listing: paths, sizes and mtimes, each folder's (segment, (st_dev, st_ino),
    count) in walk order, and the index's records of its share."""

    paths: str                     # NUL-separated: 2 ms to take back per 100k files
    sizes: array
    mtimes: array
    batches: list[tuple[Any, Any, int]]
    records: dict[str, tuple]


class ChildWalks:
    """The children of one planning, each with a pipe to send on and one to be told on. Whatever goes
    wrong with one (it cannot start, it fails, it is killed) makes `compared()` or `listings()`
    None: the caller plans in this process. A child only lists, reads and compares: it logs nothing
    (a logging lock another thread held at the fork would never be let go there), and ends with
    os._exit."""

    def __init__(self, children: list[tuple[int, int, int]]):
        self.children = children  # (pid, read end of its pipe, write end of the pipe it is told on)
        self.notes = WalkNotes(warn=None)
        self._first: list[tuple] | None = None

    @classmethod
    def start(cls, shares: Sequence[Share], job: Job) -> ChildWalks | None:
        children: list[tuple[int, int, int]] = []
        for share in shares:
            read_end, write_end = os.pipe()
            told, tell = os.pipe()
            try:
                pid = os.fork()
            except OSError:  # no memory or processes left for it
                for fd in (read_end, write_end, told, tell):
                    os.close(fd)
                cls(children).stop()
                return None
            if pid == 0:  # the child
                try:
                    os.close(read_end)
                    os.close(tell)
                    for _, other, other_tell in children:  # or the others would not see this process end
                        os.close(other)
                        os.close(other_tell)
                    try:  # Ctrl-C ends it at once, not through a handler of the parent's
                        signal.signal(signal.SIGINT, signal.SIG_DFL)
                    except ValueError:
                        pass
                    _child(share, job, write_end, told)
                finally:
                    os._exit(0)
            os.close(write_end)
            os.close(told)
            children.append((pid, read_end, tell))
        return cls(children)

    @property
    def pids(self) -> list[int]:
        return [pid for pid, _, _ in self.children]

    def compared(self) -> list[Any] | None:
        """Each child's comparison, when every child compared its share; [] when one sent its listing
        instead (then `listings()`); None when one failed."""
        first = self._first = self._receive_all()
        if first is None:
            return None
        for message in first:
            self._note(message[-1])
        if all(message[0] == "compared" for message in first):
            return [message[1] for message in first]
        return []

    def listings(self) -> list[Listing] | None:
        """Every child's listing (those that compared asked for theirs), None when one failed."""
        assert self._first is not None
        for (_, _, tell), message in zip(self.children, self._first):
            if message[0] == "compared":
                try:
                    os.write(tell, _SEND_LISTING)
                except OSError:  # it is gone
                    return None
        found = []
        for number, message in enumerate(self._first):
            if message[0] == "compared":
                message = self._receive(number)
                if message is None:
                    return None
            found.append(message[1])
        return found

    def stop(self) -> None:
        """Tell, kill and reap every child (those done already just get reaped)."""
        for pid, read_end, tell in self.children:
            for fd in (read_end, tell):
                try:
                    os.close(fd)
                except OSError:
                    pass
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.children = []

    def _receive_all(self) -> list[tuple] | None:
        found = []
        for number in range(len(self.children)):
            message = self._receive(number)
            if message is None:
                return None
            found.append(message)
        return found

    def _receive(self, number: int) -> tuple | None:
        read_end = self.children[number][1]
        head = _read_exactly(read_end, _LENGTH.size)
        body = _read_exactly(read_end, _LENGTH.unpack(head)[0]) if len(head) == _LENGTH.size else b""
        try:
            return pickle.loads(body)
        except Exception:  # nothing or part of it came: the child failed or was killed
            return None

    def _note(self, fields: tuple[list[str], list[str], list[tuple[str, str]]]) -> None:
        unreadable, not_files, warnings = fields
        self.notes.unreadable.extend(folder for folder in unreadable if folder not in self.notes.unreadable)
        self.notes.not_files.extend(not_files)
        for folder, why in warnings:
            if (folder, why) not in self.notes.warnings:
                self.notes.warnings.append((folder, why))
                warn_unreadable(folder, why)


def merged(listings: Sequence[Listing]) -> tuple[list[str], array, array]:
    """The children's listings as one walk here gives them: segments in its order (root by root, the
    root's own files, then its subfolders by name), a folder listed in two segments kept in the first.
    A root's own files come from several shares, the later share's first: a walk lists a folder's
    files in reverse name order. (A subfolder two shares split, when a root has few entries, comes
    share by share: its files and subfolders in a walk's order within each.)"""
    pieces = []
    for number, listing in enumerate(listings):
        offset = 0
        for order, (segment, folder, count) in enumerate(listing.batches):
            pieces.append((segment, -number if segment[1] == "" else number, order, folder, number, offset, count))
            offset += count
    pieces.sort(key=lambda piece: piece[:3])
    keys: list[str] = []
    sizes_of, mtimes_of = array("q"), array("q")
    claimed: dict[tuple[int, int], Any] = {}  # folder -> the segment it is listed in
    paths = [listing.paths.split("\0") if listing.paths else [] for listing in listings]
    for segment, *_, folder, number, offset, count in pieces:
        # a root's own files come from each share, the same folder; any other folder is listed once
        if folder is not None and claimed.setdefault(folder, segment) != segment:
            continue
        listing = listings[number]
        keys.extend(paths[number][offset:offset + count])
        sizes_of.extend(listing.sizes[offset:offset + count])
        mtimes_of.extend(listing.mtimes[offset:offset + count])
    return keys, sizes_of, mtimes_of


def listed_items(paths: Sequence[str], sizes: Sequence[int], mtimes: Sequence[int], excluded: tuple[str, ...]
                 ) -> list[Item]:
    """A listing's columns as items, those under `excluded` (folders --remove took out) left out."""
    make = tuple.__new__  # Item(...) through its keyword-checking __new__ cost twice as much
    items = zip(paths, sizes, mtimes)
    return [make(Item, item) for item in items if not item[0].startswith(excluded)] if excluded else \
        [make(Item, item) for item in items]


def _child(share: Share, job: Job, pipe: int, told: int) -> None:
    notes = WalkNotes(warn=None)
    paths: list[str] = []
    sizes, mtimes = array("q"), array("q")
    batches: list[tuple[Any, Any, int]] = []
    for segment, folder, files in tagged_batches(job.roots, job.skip, notes, share):
        batches.append((segment, folder, len(files)))
        for path, st in files:
            paths.append(path)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
    records: dict[str, tuple] = {}
    if job.read_index:
        # The parent's pooled connections are left alone here (SQLAlchemy's way after a fork): this
        # child reads through a connection of its own, the parent holding no lock meanwhile.
        job.store.engine.dispose(close=False)
        records = job.store.files_between([bounds for bounds in share.ranges if bounds is not None])
        if share.number == 0:  # a root that is a file, or a folder that was one
            records.update(job.store.files_at(job.root_keys))
    noted = (notes.unreadable, notes.not_files, notes.warnings)
    if job.read_index and not (job.nested or notes.linked):
        items = listed_items(paths, sizes, mtimes, job.excluded)
        _send(pipe, ("compared", job.compare(items, records, job.source), noted))
        if os.read(told, 1) != _SEND_LISTING:  # the parent is done with this child
            return
    _send(pipe, ("listed", Listing("\0".join(paths), sizes, mtimes, batches, records), noted))


def _send(pipe: int, message: tuple) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LENGTH.pack(len(body)) + body)
    while view:
        view = view[os.write(pipe, view):]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
