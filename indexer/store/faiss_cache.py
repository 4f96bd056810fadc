"""The FAISS file, a cache of the stored vectors (vector_file): named by the database's id and
generation, verified before use (its digest, dimension and ids), brought up to date from an
older file or rebuilt, written atomically, and older ones removed."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from ..errors import StoreError
from ..private_files import owner_only
from .database import storage_error
from .identity import read_meta
from .sql import set_meta


DELTA_FROM_ROWS = 50_000   # from this many rows a small change leaves the FAISS file as it is (a delta)
DELTA_MAX_ROWS = 50_000    # ... when at most this many rows (and a tenth of the file) were added
DELTA_MAX_REMOVED = 0.25   # ... and at most this fraction of the file's rows removed (tombstones)


class FaissCache:
    """The FAISS half of IndexStore (`engine`, `folder`, `vector_file` and `vectors` are the store's)."""

    engine: Engine
    folder: Path

    def _faiss_path(self, generation: int, index_id: str) -> Path:
        return self.folder / f"vectors.{index_id}.g{generation}.faiss"

    def _cache_files(self, index_id: str) -> list[Path]:
        """This database's cache files, oldest generation first."""
        prefix = f"vectors.{index_id}.g"
        return sorted((p for p in self.folder.glob(f"{prefix}*.faiss") if p.name[len(prefix):-6].isdigit()),
                      key=lambda p: int(p.name[len(prefix):-6]))

    def load_faiss_with_generation(self) -> tuple[Any, int]:
        """The FAISS index of the current state and the generation it is of: the cached file when
        it is this database's, of this generation and intact, else an older cached file brought
        up to date, else built from SQLite; all inside one read transaction (a consistent
        snapshot, even while mi-index writes)."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")  # a read snapshot: generation and vectors agree
            meta = read_meta(conn)
            generation = int(meta["generation"])
            cached = self._faiss_path(generation, meta["index_id"])
            index = self._read_verified(cached, meta, conn)
            return (index if index is not None else self._current_index(conn)), generation

    def rebuild_faiss(self):
        """The FAISS index built from SQLite alone, ignoring every cache file."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")
            return self._current_index(conn, use_cache=False)

    def _read_verified(self, path: Path, meta: dict[str, str], conn: Connection):
        """The cache file at `path` if it is intact and covers exactly the ids SQLite holds,
        else None. Cheap: a digest of the file against the one its writer recorded, and the
        count, sum and largest of the ids (rows are never rewritten, ids never reused)."""
        if not path.exists():
            return None
        index = _read_undamaged(path, meta)
        if index is None:
            return None
        count, total, largest = conn.execute(text("SELECT count(*), coalesce(sum(id), 0), coalesce(max(id), -1) "
                                                  "FROM images")).one()
        ids = _faiss_ids(index)
        held = (len(ids), int(ids.sum()) if len(ids) else 0, int(ids.max()) if len(ids) else -1)
        if index.ntotal != count or held != (count, total, largest):
            return None
        return index

    def write_faiss(self) -> Path:
        """Write the FAISS file of the current generation atomically (tmp, fsync, rename), record
        its digest, and remove every other cache file. An existing file of this generation is
        kept only when it verifies: an unchanged re-run repairs a damaged cache."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")
            meta = read_meta(conn)
            kept = self._kept_for_delta(conn, meta)
            if kept is not None:
                return kept
            target = self._faiss_path(int(meta["generation"]), meta["index_id"])
            intact = self._read_verified(target, meta, conn) is not None
            covers = _covers_record(target, conn, meta)
            if not intact:
                index = self._current_index(conn, use_cache=not target.exists())  # damaged: from SQLite alone
                self._write_atomically(index, target)
        if not intact or not meta.get("faiss_digest", "").startswith(target.name + ":") \
                or meta.get("faiss_covers") != covers:
            with self.engine.begin() as conn:
                set_meta(conn, {"faiss_digest": _digest_record(target), "faiss_covers": covers})
        for old in self.folder.glob("vectors.*"):  # older generations, other databases', tmp files of killed runs
            if old != target:
                old.unlink(missing_ok=True)
        return target

    def _kept_for_delta(self, conn: Connection, meta: dict[str, str]) -> Path | None:
        """The cache file to keep as it is, when only a few rows changed since it was written: a
        running Searcher searches the rows added since exactly and leaves out the removed ones
        (retrieval.live_index), a fresh one adds them on load (_current_index); the file is
        rewritten when the rows added pass DELTA_MAX_ROWS or those removed DELTA_MAX_REMOVED.
        Known from meta.faiss_covers (the file's row count, largest id and kind) and two indexed
        counts: the file itself is not read."""
        from . import vectors as vector_index

        try:
            name, count, largest, kind = meta.get("faiss_covers", "").rsplit(":", 3)
            count, largest = int(count), int(largest)
        except ValueError:
            return None
        path = self.folder / name
        if count < DELTA_FROM_ROWS or not meta.get("faiss_digest", "").startswith(name + ":") \
                or not name.startswith(f"vectors.{meta['index_id']}.g") or not path.exists():
            return None
        new, held = conn.exec_driver_sql("SELECT count(*) FILTER (WHERE id > ?), count(*) FILTER (WHERE id <= ?) "
                                         "FROM images", (largest, largest)).one()
        # Added rows are searched exactly by a running reader, so they are bounded by a row count;
        # removed rows cost a reader only an exclusion filter (and a fresh one a remove_ids on
        # load), so they are bounded by a fraction: `--remove` of 10% at 1M images then writes
        # nothing here (rewriting the 2 GB file took ~10 s) and a later large change compacts.
        if new > min(DELTA_MAX_ROWS, count // 10) or count - held > count * DELTA_MAX_REMOVED \
                or kind != vector_index.choose_kind(
                new + held, int(meta.get("model_dim") or 1), _memory_budget(meta)):
            return None
        for old in self.folder.glob("vectors.*"):
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def faiss_file_name(self) -> str | None:
        """The name of the cache file written last (it may be of an older generation: a delta)."""
        with self.engine.connect() as conn:
            recorded = read_meta(conn).get("faiss_covers", "")
        return recorded.rsplit(":", 3)[0] or None

    def faiss_delta(self, largest: int, count: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
        """What changed since a FAISS index holding `count` rows, the largest id `largest`, in one
        snapshot: (generation, ids added since, their vectors, the ids up to `largest` held now, or
        None when all `count` still are). Ids only grow, so added rows are those above `largest`."""
        from .reads import raw_ids

        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")
            meta = read_meta(conn)
            new_ids = raw_ids(conn, "SELECT id FROM images WHERE id > ? ORDER BY id", (largest,))
            new_vectors = self.vector_file.read(new_ids) if len(new_ids) else \
                np.zeros((0, int(meta.get("model_dim") or 1)), np.float32)
            held = conn.exec_driver_sql("SELECT count(*) FROM images WHERE id <= ?", (largest,)).scalar()
            kept = None if held == count else raw_ids(conn, "SELECT id FROM images WHERE id <= ?", (largest,))
            return int(meta["generation"]), new_ids, new_vectors, kept

    def _write_atomically(self, index, target: Path) -> None:
        from .vectors import faiss  # loaded as vectors loads it (its OpenMP threads' wait policy)

        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            with owner_only():
                faiss.write_index(index, str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except (OSError, RuntimeError) as e:  # FAISS reports a failed write as RuntimeError
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise storage_error(e, self.folder) from None
            free = shutil.disk_usage(self.folder).free
            raise (storage_error(OSError(errno.ENOSPC, "no space left"), self.folder)
                   if free < 16 << 20 else StoreError(f"cannot write {tmp}: {e}")) from None

    def _current_index(self, conn: Connection, use_cache: bool = True):
        """The index of what `conn` sees: this database's newest older FAISS file updated by the
        difference (row ids are never reused and rows never change, so ids say what to add and
        remove), or, when there is none or the collection changed too much, built from all
        vectors."""
        from . import vectors as vector_index
        from .reads import raw_ids
        from .vectors import faiss
        from .vector_file import StoredRows

        db_ids = raw_ids(conn, "SELECT id FROM images ORDER BY id")
        meta = read_meta(conn)
        older = self._cache_files(meta["index_id"]) if use_cache else []
        index = _read_undamaged(older[-1], meta) if older else None
        if index is not None:
            cached = np.sort(_faiss_ids(index))
            gone, new = np.setdiff1d(cached, db_ids), np.setdiff1d(db_ids, cached)
            same_kind = vector_index.index_kind(index) == vector_index.choose_kind(
                len(db_ids), index.d, _memory_budget(meta))
            if same_kind and len(new) <= max(len(cached) - len(gone), 0):  # IVF lists trained on most of it
                if len(gone):
                    index.remove_ids(faiss.IDSelectorBatch(gone))
                if len(new):
                    index.add_with_ids(self.vectors(new.tolist(), conn), new)
                return index
        vectors = StoredRows(self.vector_file, db_ids) if len(db_ids) else self.all_vectors(conn)[1]
        return vector_index.build_faiss_index(vectors, db_ids, memory_budget=_memory_budget(meta))

    def set_faiss_memory(self, gigabytes: float | None) -> None:
        """Keep the FAISS index within this many GB from now on (None: no budget): flat, IVF
        fp16 or IVF-PQ, whichever fits (indexer.store.vectors.choose_kind). A change rebuilds it."""
        value = str(int(gigabytes * 1e9)) if gigabytes else None
        with self.engine.begin() as conn:
            if read_meta(conn).get("faiss_memory_bytes") == value:
                return
            if value is None:
                conn.execute(text("DELETE FROM meta WHERE key = 'faiss_memory_bytes'"))
            else:
                set_meta(conn, {"faiss_memory_bytes": value})
            conn.execute(text("DELETE FROM meta WHERE key = 'faiss_digest'"))
        for cached in self.folder.glob("vectors.*"):  # built for the old budget
            cached.unlink(missing_ok=True)


def _covers_record(path: Path, conn: Connection, meta: dict[str, str]) -> str:
    """What meta.faiss_covers holds for the cache file at `path` of what `conn` sees: its name,
    row count, largest id and kind (so that a small change can keep it: _kept_for_delta)."""
    from . import vectors as vector_index

    count, largest = conn.execute(text("SELECT count(*), coalesce(max(id), -1) FROM images")).one()
    kind = vector_index.choose_kind(count, int(meta.get("model_dim") or 1), _memory_budget(meta))
    return f"{path.name}:{count}:{largest}:{kind}"


def _memory_budget(meta: dict[str, str]) -> int | None:
    return int(meta["faiss_memory_bytes"]) if meta.get("faiss_memory_bytes") else None


def _read_undamaged(path: Path, meta: dict[str, str]):
    """The FAISS file at `path` when it is not damaged since its writer recorded its digest (a
    flipped bit, a truncated copy), reads, and has the index's dimension; else None."""
    from .vectors import faiss

    recorded = meta.get("faiss_digest", "")
    try:
        if recorded.startswith(path.name + ":") and recorded != _digest_record(path):
            return None
        index = faiss.read_index(str(path))
    except (OSError, RuntimeError, ValueError, MemoryError):  # removed meanwhile by a newer write, or damaged
        return None
    if index.d != int(meta.get("model_dim") or index.d):
        return None
    return index


def _digest_record(path: Path) -> str:
    """What meta.faiss_digest holds for the cache file at `path`: its name, size and digest."""
    return f"{path.name}:{_file_digest(path)}"


def _file_digest(path: Path, block: int = 1 << 20) -> str:
    """Size and BLAKE2b of a file (read whole up to 256 MB, 256 spread 1 MB blocks beyond: a
    large cache is checked by sampling, and every shown score is re-checked against SQLite)."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= 256 * block:
            while chunk := f.read(block):
                digest.update(chunk)
        else:
            for i in range(256):
                f.seek((size - block) * i // 255)
                digest.update(f.read(block))
    return f"{size}:{digest.hexdigest()}"


def _faiss_ids(index) -> np.ndarray:
    """The ids held by a FAISS index: an IndexIDMap's map, or an IVF index's inverted lists."""
    from .vectors import faiss

    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
             for i in range(ivf.nlist) if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
