"""Instances that arrive (over C-STORE, see `indexer.receive.scp`): kept as files under one folder by
their UIDs, written atomically, and indexed in the background in small batches.

    STORE/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

A file is written to a hidden temporary name in its own folder, fsynced, then renamed: a file
under its final name is always whole, so the sender's success answer means the instance is on
disk. The UIDs become path parts only when they are UIDs (digits and dots, at most 64
characters): a hostile dataset cannot name a path outside STORE.

One thread indexes (the index has one writer): woken when an association ends, when
`batch_files` instances wait, or `batch_seconds` after the oldest waiting one arrived. It runs
the indexer over the files that arrived (`ArrivalsSource`), with the model loaded once. Files
it could not index now (another mi-index holds the index, a full disk) stay where they are;
the pass over STORE at start-up indexes whatever STORE holds but the index lacks.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IndexBusyError, MIError, NoImagesError, StorageFullError, one_line
from ..private_files import fsync_folder

log = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX_LENGTH = 64
TEMP_PREFIX = ".arriving-"  # hidden: mi-index's folder walk leaves it out
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UnsafeUIDError(MIError, ValueError):
    """A UID that cannot name a file: not digits and dots, or longer than 64 characters."""


def checked_uid(value: Any, what: str) -> str:
    """`value` as a UID fit to be a path part, else UnsafeUIDError (trailing NUL and spaces,
    DICOM's padding, removed)."""
    uid = str(value if value is not None else "").rstrip("\0 ")
    if not uid or len(uid) > UID_MAX_LENGTH or not UID_PATTERN.fullmatch(uid):
        shown = uid if len(uid) <= 80 else uid[:77] + "..."
        raise UnsafeUIDError(f"{what} {shown!r} is not a UID (digits and dots, at most 64 characters)")
    return uid


@dataclass(frozen=True)
class InstanceFolder:
    """The folder received instances are kept in, one file per SOP Instance UID."""

    root: Path

    def create(self) -> None:
        """Make the folder (owner-only when it is made here)."""
        from ..private_files import private_folder
        private_folder(self.root)

    def path_for(self, study: Any, series: Any, instance: Any) -> Path:
        """Where an instance with these UIDs is kept (UnsafeUIDError if any is not a UID)."""
        return (self.root / checked_uid(study, "Study Instance UID") / checked_uid(series, "Series Instance UID")
                / f"{checked_uid(instance, 'SOP Instance UID')}.dcm")

    def write(self, target: Path, data: bytes) -> None:
        """Write `data` at `target` atomically: a hidden temporary file in the same folder, fsynced,
        renamed over `target`, and the folder fsynced. On failure (OSError) nothing is left
        behind and an earlier file at `target` is untouched."""
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = target.with_name(f"{TEMP_PREFIX}{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            # owner-only, as the index's own files: they hold PHI
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_folder(target.parent)

    def remove_leftovers(self) -> int:
        """Remove the temporary files of writes a killed receiver left (never acknowledged);
        the number removed."""
        removed = 0
        if self.root.is_dir():
            for tmp in self.root.glob(f"*/*/{TEMP_PREFIX}*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed



@dataclass
class ArrivalsSource:
    """An `indexer.sources.Source` of the files that arrived: listed as given, compared with the
    index's records of those files only (never a walk of the whole folder), never swept."""

    paths: Sequence[str]
    refused: list[tuple[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{len(self.paths)} received instances"

    def items(self) -> Iterator[Any]:
        from ..sources import Item

        for path in dict.fromkeys(self.paths):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # replaced or removed meanwhile: a later arrival or the start-up pass has it
            yield Item(os.path.realpath(path), st.st_size, st.st_mtime_ns)

    def known(self, store: Any, listed: Sequence[str]) -> dict[str, tuple]:
        return store.files_at(list(listed))

    def accepts(self, item: Any) -> bool:
        return True  # written here from a C-STORE: a DICOM file

    def sweepable(self, key: str) -> bool:
        return False

    def read(self, item: Any) -> bytes:
        with open(item.key, "rb") as f:
            return f.read()


class ArrivalIndexer:
    """The one thread that indexes arrivals into `index_dir` (see the module's docstring).
    `model`: a loaded encoder. `options`: an `indexer.IndexOptions`."""

    def __init__(self, folder: InstanceFolder, index_dir: Path, model: Any, options: Any, *,
                 batch_files: int = 64, batch_seconds: float = 1.0, retry_seconds: float = 5.0):
        self.folder, self.index_dir, self.model, self.options = folder, Path(index_dir), model, options
        self.batch_files, self.batch_seconds, self.retry_seconds = batch_files, batch_seconds, retry_seconds
        self._waiting: list[str] = []
        self._oldest = 0.0          # monotonic time the oldest waiting file arrived
        self._now = False           # an association ended: index what waits without delay
        self._stopping = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mi-receive-indexer", daemon=True)
        self.batches = 0            # batches indexed (for tests and benchmarks)
        self.indexed_at: dict[str, float] = {}  # path -> monotonic time its batch was committed (bounded)

    def start(self, initial_pass: bool = True) -> ArrivalIndexer:
        self._initial_pass = initial_pass
        self._thread.start()
        return self

    def arrived(self, path: Path) -> None:
        with self._wake:
            if not self._waiting:
                self._oldest = time.monotonic()
            self._waiting.append(str(path))
            if len(self._waiting) >= self.batch_files:
                self._wake.notify()

    def association_ended(self) -> None:
        with self._wake:
            if self._waiting:
                self._now = True
                self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Index what waits, then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        if self._initial_pass:
            self._index_whole_folder()
        while True:
            with self._wake:
                while not self._due():
                    if self._stopping and not self._waiting:
                        return
                    self._wake.wait(self._seconds_left())
                batch, self._waiting, self._now = self._waiting, [], False
                stopping = self._stopping
            if not self._index(batch) and not stopping:
                with self._wake:  # not indexed now (index busy, disk full): back in the queue, later
                    self._waiting[:0] = batch
                    self._oldest = time.monotonic() + self.retry_seconds - self.batch_seconds
            elif stopping:
                with self._wake:
                    if not self._waiting:
                        return

    def _due(self) -> bool:
        if not self._waiting:
            return False
        return (self._now or self._stopping or len(self._waiting) >= self.batch_files
                or self._seconds_left() <= 0)

    def _seconds_left(self) -> float | None:
        if not self._waiting:
            return None
        return max(0.0, self._oldest + self.batch_seconds - time.monotonic())

    def _index(self, paths: list[str]) -> bool:
        """Index `paths`; False when it could not be done now and should be tried again."""
        from .. import index_source

        try:
            summary = index_source(ArrivalsSource(paths), self.index_dir, roots=[str(self.folder.root)],
                                   model=self.model, options=self.options)
        except (IndexBusyError, StorageFullError) as e:
            log.warning("%s; %d received instances wait in %s", one_line(e), len(paths), self.folder.root)
            return False
        except NoImagesError:
            return True  # every file was replaced or removed meanwhile
        except (MIError, OSError) as e:
            log.error("indexing %d received instances failed: %s (they stay in %s; a restart indexes them)",
                      len(paths), one_line(e), self.folder.root)
            return not (isinstance(e, OSError) and e.errno in OUT_OF_SPACE)
        now = time.monotonic()
        self.batches += 1
        if len(self.indexed_at) > 100_000:
            self.indexed_at.clear()
        self.indexed_at.update(dict.fromkeys(paths, now))
        for skipped in summary["skipped_files"]:
            log.warning("received instance not indexed: %s: %s", skipped["path"], skipped["reason"])
        log.info("indexed %d received instances (%d new, %d updated) into %s", len(paths), summary["new"],
                 summary["updated"], self.index_dir)
        return True

    def _index_whole_folder(self) -> None:
        """What STORE holds but the index lacks (instances a killed receiver stored but did not
        index; files copied in by hand): one run of the indexer over STORE."""
        from .. import index_paths

        removed = self.folder.remove_leftovers()
        if removed:
            log.info("removed %d partial files of an interrupted receiver", removed)
        if not any(self.folder.root.glob("*/*/*.dcm")):
            return
        try:
            summary = index_paths([self.folder.root], self.index_dir, model=self.model, options=self.options)
        except MIError as e:
            log.error("indexing what %s holds failed: %s", self.folder.root, one_line(e))
            return
        if summary["new"] or summary["updated"] or summary["removed"]:
            log.info("indexed what %s holds: %d new, %d updated, %d removed", self.folder.root, summary["new"],
                     summary["updated"], summary["removed"])
