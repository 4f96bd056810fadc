"""The image vectors, one file beside SQLite (`embeddings.f16`): float16, row id `i`'s vector at a
fixed offset (header + i * dim * 2), so that reading any set of rows is a pread per run of neighbouring rows.

Why not SQLite row blobs: a float32 vector (4 KB) does not fit a 4 KB page, so every row took an
overflow page, every count or filter scan read the vectors too, and `--remove` zeroed (secure_delete)
and logged twice (WAL) four kilobytes per image. Why float16: half the disk, and a cosine of unit
vectors moves by ~1e-5 (under the 1e-3 the scores are shown to), far below the gap between neighbours.

Crash safety comes from the order of writes (the one writer holds the index's lock):
- adding: the rows get their ids inside the SQLite transaction, their vectors are written here and
  fsynced, and only then the transaction commits. A kill before the commit leaves vectors past the
  last committed id; the next run gets the same ids again (the rolled-back AUTOINCREMENT) and
  overwrites them. No reader ever sees a row whose vector is not on disk.
- removing: the transaction that deletes rows records their ids as pending (meta.vectors_to_clear);
  after the commit their bytes are punched out (zeroed, the disk space freed) and the record
  dropped. A kill in between is finished by the next writer (`IndexStore.lock`). The zeros are not
  fsynced: a killed process's writes still reach the disk, the index never reads a removed row (ids
  are not reused), and SQLite's own freed pages (secure_delete) are scrubbed from the file only at
  its next checkpoint too; only a power cut within the kernel's writeback delay could leave a removed
  image's vector in its dead row. The fsync was 2 of the 7 s of removing 10% at 1M.
"""
from __future__ import annotations

import ctypes
import functools
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import IndexDamagedError
from ..private_files import fsync_folder, owner_only

FILE_NAME = "embeddings.f16"
_MAGIC = b"MIVECF16"
_HEADER = 64                  # magic, dim (uint32), zero padding: row 0 starts page-aligned enough
_DTYPE = np.dtype("<f2")
# Rows this close together are read in one pread (a few dead rows between them cost less than a call each).
_SPAN_ROWS = 64
PREFETCH_MIN_RUNS = 32        # scattered reads of this many runs of rows ask the kernel for all of them first
_FALLOC_PUNCH_HOLE = 0x03     # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (Linux)
# How far a stored element may be from the float32 one it was made from: float16 keeps 11 bits
# (half an ulp, 2^-12 of it, for elements of a unit vector below 1, so at most 2.5e-4), then the
# row is renormalised. Two float32 vectors that differ in the last bits may round to neighbouring
# float16 values, so this is also how far apart two stored copies of one image may be.
STORED_ATOL = 5e-4


class VectorFile:
    """`embeddings.f16` in an index folder: `write` before the commit, `read` after, `clear` for
    removed rows."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / FILE_NAME

    # ------------------------------------------------------------------ reading
    def dim(self) -> int | None:
        """The vectors' dimension, from the header; None when there is no file yet."""
        try:
            with open(self.path, "rb", buffering=0) as f:
                return _header_dim(self.path, os.pread(f.fileno(), 12, 0))
        except FileNotFoundError:
            return None

    def read(self, ids: np.ndarray | list[int], *, prefetched: bool = False) -> np.ndarray:
        """float32 (len(ids), dim) of rows SQLite holds, in the order of `ids`. Read into memory of its own,
        not through a map: every mapped page a process touches counts in its RSS until the kernel takes it
        back, so a FAISS build's training sample of a 20 GB file (10M rows) showed 7.4 GB, and a server
        that re-ranks from the file at every query grew the same way. `prefetched`: the caller has asked
        the kernel for these rows already (`prefetch`), so scattered ones are not asked for again."""
        ids = np.asarray(ids, dtype=np.int64)
        try:
            f = open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            if len(ids):
                raise self._cut_short(0, int(ids.max()) + 1) from None
            return np.zeros((0, 0), np.float32)
        with f:
            fd = f.fileno()
            dim = _header_dim(self.path, os.pread(fd, 12, 0))
            if not len(ids):
                return np.zeros((0, dim), np.float32)
            held = (os.fstat(fd).st_size - _HEADER) // (dim * _DTYPE.itemsize)
            first, last = int(ids.min()), int(ids.max())
            if first < 0 or last >= held:
                raise self._cut_short(held, last + 1)
            if last + 1 - first <= max(2 * len(ids), _SPAN_ROWS):  # near one another: one read
                return _unit(self._read_rows(fd, first, last + 1 - first, dim)[ids - first])
            wanted = np.unique(ids)  # scattered: a read per run of consecutive rows
            runs = id_runs(wanted)
            if not prefetched:
                _prefetch(fd, runs, dim)
            block = np.empty((len(wanted), dim), dtype=_DTYPE)
            at = 0
            for run_first, run_last in runs:
                block[at:at + run_last + 1 - run_first] = self._read_rows(fd, run_first, run_last + 1 - run_first, dim)
                at += run_last + 1 - run_first
            return _unit(block[np.searchsorted(wanted, ids)])

    def prefetch(self, ids: np.ndarray | list[int]) -> None:
        """Ask the kernel to start reading the rows of `ids` (scattered ones: a re-ranking's candidates), so that
        their reads overlap with other work and with one another; a no-op where the file or the call is missing."""
        runs = id_runs(np.unique(np.asarray(ids, dtype=np.int64)))
        if len(runs) < PREFETCH_MIN_RUNS:
            return
        try:
            f = open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            return
        with f:  # one open for the header and the advice (dim() would open it again)
            _prefetch(f.fileno(), runs, _header_dim(self.path, os.pread(f.fileno(), 12, 0)))

    def _read_rows(self, fd: int, first: int, count: int, dim: int) -> np.ndarray:
        """Rows first..first+count-1 (float16)."""
        block = np.empty((count, dim), dtype=_DTYPE)
        view, done, offset = memoryview(block).cast("B"), 0, _HEADER + first * dim * _DTYPE.itemsize
        while done < block.nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if not got:
                raise self._cut_short(first + done // (dim * _DTYPE.itemsize), first + count)
            done += got
        return block

    def _cut_short(self, held: int, needed: int) -> IndexDamagedError:
        return IndexDamagedError(f"{self.path} holds vectors up to row {held - 1}, the index up to {needed - 1} "
                                 f"(cut short): move the index away and run mi-index again")

    # ------------------------------------------------------------------ writing (the one writer)
    def write(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Write rows `ids` (ascending, each once) and fsync: call before the commit that adds them."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not len(ids):
            return
        if vectors.shape != (len(ids), vectors.shape[-1]) or vectors.ndim != 2:
            raise ValueError(f"{len(ids)} ids and vectors of shape {vectors.shape}")
        dim = vectors.shape[1]
        row_bytes = dim * _DTYPE.itemsize
        packed = vectors.astype(_DTYPE)
        with self._open_for_writing(dim) as f:
            at = 0  # runs of consecutive ids: one write each (a commit's new rows are one run)
            for first, last in id_runs(ids):
                os.pwrite(f.fileno(), packed[at:at + last + 1 - first].tobytes(), _HEADER + first * row_bytes)
                at += last + 1 - first
            os.fsync(f.fileno())

    def clear(self, runs: list[tuple[int, int]]) -> None:
        """Zero rows in the inclusive id ranges `runs` and free their disk (removed rows); not fsynced (see above)."""
        dim = self.dim()
        if not dim or not runs:
            return
        row_bytes = dim * _DTYPE.itemsize
        with open(self.path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            for first, last in runs:
                start = _HEADER + first * row_bytes
                length = min((last + 1 - first) * row_bytes, max(size - start, 0))
                if length > 0:
                    _punch_hole(f.fileno(), start, length)

    def reset(self) -> None:
        """Remove the file (an index that holds no rows starts again with any dimension)."""
        self.path.unlink(missing_ok=True)

    def _open_for_writing(self, dim: int):
        existing = self.dim()
        if existing is not None and existing != dim:
            raise IndexDamagedError(f"{self.path} holds {existing}-d vectors, not {dim}-d")
        if existing is None:
            with owner_only():
                with open(self.path, "wb") as f:
                    f.write(_MAGIC + struct.pack("<I", dim) + bytes(_HEADER - 12))
                    os.fsync(f.fileno())
            fsync_folder(self.path.parent)
        return open(self.path, "r+b")


class StoredRows:
    """Rows `ids` of a VectorFile as a read-only (N, D) float32 array-like, read when indexed
    (`rows[a:b]`, `rows[positions]`): a FAISS index is built from it a chunk at a time instead of
    from every vector in memory at once."""

    def __init__(self, vector_file: VectorFile, ids: np.ndarray):
        self.vector_file = vector_file
        self.ids = np.asarray(ids, dtype=np.int64)
        self.shape = (len(self.ids), vector_file.dim() or 0)
        self.ndim = 2

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index) -> np.ndarray:
        return self.vector_file.read(self.ids[index])


def _prefetch(fd: int, runs: list[tuple[int, int]], dim: int) -> None:
    """posix_fadvise(WILLNEED) for each run of rows, from PREFETCH_MIN_RUNS runs: the kernel reads them all at
    once, not one after another as the preads would (100 scattered rows of a 20 GB file not in the page cache:
    21-25 ms instead of 28-37). A few rows gain nothing: through mi-serve at 1M (10 rows a query, the file in
    the page cache) asking cost 1-3 ms of 25."""
    if not hasattr(os, "posix_fadvise") or len(runs) < PREFETCH_MIN_RUNS:
        return
    row = dim * _DTYPE.itemsize
    for run_first, run_last in runs:
        os.posix_fadvise(fd, _HEADER + run_first * row, (run_last + 1 - run_first) * row, os.POSIX_FADV_WILLNEED)


def _header_dim(path: Path, head: bytes) -> int:
    if len(head) < 12 or head[:8] != _MAGIC:
        raise IndexDamagedError(f"{path} is not a vector file of this program: move the index away and "
                                f"run mi-index again to rebuild it")
    return struct.unpack("<I", head[8:12])[0]


def _unit(rows: np.ndarray) -> np.ndarray:
    """float16 rows as float32 of norm 1 again: rounding moved each element by up to 2^-11 of it,
    which shifts a dot product to first order (an image against itself scored 0.99998); after
    renormalising, only to second order (1.0 to 1e-8). Zero rows (holes) stay zero."""
    rows = rows.astype(np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=rows, where=norms > 0)


def id_runs(ids: np.ndarray | list[int]) -> list[tuple[int, int]]:
    """Sorted ids as inclusive (first, last) ranges of consecutive ids: a removed folder is a few."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if not len(ids):
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(ids) - 1]])
    return [(int(ids[s]), int(ids[e])) for s, e in zip(starts, ends)]


_HOLE_MIN = 1 << 16   # shorter ranges are overwritten with zeros: a hole frees whole blocks only anyway


def _punch_hole(fd: int, start: int, length: int) -> None:
    """Zero bytes start..start+length, and for a long range deallocate them (they read as zeros):
    zeros written where the range is short, or the file system or platform has no hole punching."""
    fallocate = _fallocate() if length >= _HOLE_MIN else None
    if fallocate is not None and fallocate(fd, _FALLOC_PUNCH_HOLE, start, length) == 0:
        return
    zeros = bytes(min(length, 1 << 20))
    for offset in range(start, start + length, len(zeros)):
        os.pwrite(fd, zeros[:min(len(zeros), start + length - offset)], offset)


@functools.cache
def _fallocate():
    """libc's fallocate(2), looked up once (100k removed rows made 100k lookups cost 6 s), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return function
