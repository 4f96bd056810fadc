"""The index folder: SQLite (the source of truth) and a FAISS file (a cache of it).

    INDEX_DIR/
      index.sqlite            schema in indexer/schema.py; every embedding is stored here as a float32 blob
      vectors.<ID>.g<N>.faiss the FAISS index of generation N of the database whose meta.index_id
                              is ID; verified on open (digest, dimension, ids), else rebuilt
      index.lock              held by the one mi-index that may write at a time

Each committed batch bumps `generation`. A FAISS file is used only when its generation is
the database's, so a reader never sees vectors that SQLite does not hold (and the other
way round); otherwise the reader builds the index from SQLite inside one read
transaction, a consistent snapshot even while mi-index is writing. Row ids are never
reused (AUTOINCREMENT), and they are the FAISS ids.
"""
from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.pool import QueuePool

DB_NAME = "index.sqlite"
METADATA_FIELDS = ("width", "height", "source_format", "sop_instance_uid", "study_instance_uid",
                   "series_instance_uid", "modality", "body_part", "view_position", "study_date",
                   "series_description", "patient_sex", "patient_age", "patient_hash")


from ..filters import SearchFilters
from .schema import MIGRATIONS, SCHEMA_VERSION
from ..location import INDEX_ENV, default_index_dir  # noqa: F401  (re-exported)
from ..errors import (IndexBusyError, IndexDamagedError, IndexFormatError, IndexNotFoundError, one_line,  # noqa: F401
                     IndexReadOnlyError, ModelMismatchError, StorageFullError, StoreError)


def storage_error(error: BaseException, folder: Path) -> StoreError:
    """The one-line, typed error for a failure of the index's storage: an OSError, or an SQLite
    error (raw or wrapped by SQLAlchemy). Each names its cause and what to do about it."""
    cause = getattr(error, "orig", None) or error
    number = getattr(cause, "errno", None)
    text_ = one_line(cause).lower()
    code = getattr(cause, "sqlite_errorname", "")
    if number == errno.ENOSPC or number == errno.EDQUOT or code == "SQLITE_FULL" or "disk is full" in text_:
        return StorageFullError(f"the disk holding the index {folder} is full: free some space and run "
                                f"mi-index again (what was committed is kept)")
    cannot_open = code == "SQLITE_CANTOPEN" or "unable to open" in text_
    if number in (errno.EROFS, errno.EACCES, errno.EPERM) or code.startswith("SQLITE_READONLY") \
            or "readonly" in text_ or "read-only" in text_ or (cannot_open and not _writable(folder)):
        return IndexReadOnlyError(f"the index {folder} is read-only ({_why_not_writable(folder)}): mi-index "
                                  f"needs to write there; use --index with a folder you can write (mi-search "
                                  f"can still read it)")
    if code in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in text_ or "not a database" in text_:
        return IndexDamagedError(f"the index database {folder / DB_NAME} is damaged ({text_}): move the "
                                 f"folder away and run mi-index again to rebuild it")
    if number is not None:
        return StoreError(f"cannot use the index {folder}: {cause.strerror or text_}")
    return IndexFormatError(f"{folder / DB_NAME} is not a usable index ({text_}); move it away and run "
                            f"mi-index again")


def _lock_exclusively(file) -> None:
    """A non-blocking exclusive lock held until the file is closed (or the process dies);
    OSError when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)


_held_locks: list = []  # lock files of this process: closed in forked children (see IndexStore.lock)


def _close_locks_in_child() -> None:
    # flock belongs to the open file description, which fork() shares: a forked decoding worker
    # would otherwise keep the writer's lock after the writer dies (SIGKILL, OOM killer) and
    # refuse every later run. Closing the child's copy leaves the parent's lock in place.
    for file in _held_locks:
        try:
            os.close(file.fileno())
        except OSError:
            pass
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


def sqlite_uri(db: Path, **params: str) -> str:
    """An SQLite URI for the file `db` with its characters quoted: a path holding `#`, `?` or
    `%` must name that file, not cut the URI short or pass part of the path as a parameter."""
    uri = Path(db).absolute().as_uri()
    return uri + ("?" + "&".join(f"{key}={value}" for key, value in params.items()) if params else "")


def _db_path(path: str | os.PathLike) -> str | bytes:
    """A path as SQLite stores it: text, or for a name that is not valid UTF-8 (legal on Linux,
    common on old shares; Python holds its bytes as surrogate escapes) the raw bytes as a BLOB,
    so that every name round-trips exactly."""
    path = os.fspath(path)
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def _py_path(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _db_prefix(folder: str | os.PathLike) -> bytes:
    """`folder/` as bytes, compared with CAST(path AS BLOB): matches text and BLOB paths alike."""
    return os.fsencode(os.fspath(folder).rstrip(os.sep) + os.sep)


def _writable(folder: Path) -> bool:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    return os.access(existing, os.W_OK)


def _why_not_writable(folder: Path) -> str:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    try:
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            return "a read-only file system"
    except (OSError, AttributeError):
        pass
    return "no permission to write"


def _raise_storage_error(context, folder: Path) -> None:
    # SQLAlchemy's error hook: every database error of this engine, whichever query met it,
    # leaves as the typed one-line StoreError (a full disk in the middle of a commit included).
    error = context.original_exception
    if isinstance(error, sqlite3.OperationalError) or type(error) is sqlite3.DatabaseError:
        raise storage_error(error, folder) from None


def _connect_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA busy_timeout = 30000")
    cursor.close()


class IndexStore:
    """One index folder. Open with `IndexStore.open(path, create=..., readonly=...)`."""

    def __init__(self, folder: Path, engine: Engine, readonly: bool):
        self.folder = folder
        self.engine = engine
        self.readonly = readonly
        self._lock_file = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = False, readonly: bool = False) -> IndexStore:
        folder = Path(path).expanduser().resolve()
        db = folder / DB_NAME
        if not db.exists():
            if not create:
                raise IndexNotFoundError(f"no index at {folder}: build one with `mi-index FOLDER --index {folder}`")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise storage_error(e, folder) from None
        # A read-only folder (or medium) has no live writer, and SQLite could not create the
        # -shm file a WAL database needs even for reading: open it as immutable there.
        params = {"mode": "ro"} if readonly else {}
        if readonly and not os.access(folder, os.W_OK):
            params["immutable"] = "1"
        uri = sqlite_uri(db, **params)
        # The connection is made by `creator`, never from a URL: SQLAlchemy would parse `?`
        # and `#` in the folder's name as parts of its own URL.
        engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
                               poolclass=QueuePool)
        event.listen(engine, "connect", _connect_pragmas)
        event.listen(engine, "handle_error", lambda context: _raise_storage_error(context, folder))
        store = cls(folder, engine, readonly)
        try:
            with engine.begin() as conn:
                if not readonly:
                    conn.exec_driver_sql("PRAGMA journal_mode = WAL")
                    # DDL runs in autocommit under Python's sqlite3 unless a transaction is opened
                    # explicitly: a migration killed halfway must leave nothing behind.
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                store._migrate(conn)
        except StoreError:
            engine.dispose()
            raise
        except (DatabaseError, OperationalError) as e:
            engine.dispose()
            raise storage_error(e, folder) from None
        return store

    def _migrate(self, conn: Connection) -> None:
        has_meta = conn.execute(text("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'")).first()
        version = int(conn.execute(text("SELECT value FROM meta WHERE key='schema_version'")).scalar() or 0) \
            if has_meta else 0
        if version > SCHEMA_VERSION:
            raise IndexFormatError(f"the index at {self.folder} has schema version {version}, newer than this "
                                   f"program's {SCHEMA_VERSION}: upgrade medimageinsight-search")
        if version < SCHEMA_VERSION:
            if self.readonly:
                raise IndexFormatError(f"the index at {self.folder} needs an upgrade: run mi-index on it first")
            for migration in MIGRATIONS[version:]:
                migration(conn)
            conn.execute(text("INSERT OR REPLACE INTO meta VALUES ('schema_version', :v)"), {"v": str(SCHEMA_VERSION)})

    def lock(self) -> None:
        """Take the writer's lock; a second mi-index on the same index is refused, not interleaved."""
        try:
            self._lock_file = open(self.folder / "index.lock", "w")
        except OSError as e:
            raise storage_error(e, self.folder) from None
        try:
            _lock_exclusively(self._lock_file)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise IndexBusyError(f"another mi-index is writing to {self.folder}; wait for it to finish") from None
        _held_locks.append(self._lock_file)

    def close(self) -> None:
        self.engine.dispose()
        if self._lock_file is not None:
            if self._lock_file in _held_locks:
                _held_locks.remove(self._lock_file)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- meta and model identity
    def _meta(self, conn: Connection) -> dict[str, str]:
        return dict(conn.execute(text("SELECT key, value FROM meta")).all())

    @property
    def model_info(self) -> dict[str, Any] | None:
        """{fingerprint, dim, source} of the model the index was built with; None before the first image."""
        with self.engine.connect() as conn:
            meta = self._meta(conn)
        if "model_fingerprint" not in meta:
            return None
        return {"fingerprint": meta["model_fingerprint"], "dim": int(meta["model_dim"]),
                "source": meta.get("model_source")}

    def patient_key(self) -> bytes:
        """The key of this index's patient pseudonyms (see indexer.privacy): recorded by its id
        on first use, and refused when another key is in place (pseudonyms made with two keys
        would split each patient in two)."""
        from ..privacy import KEY_ENV, PatientKeyError, key_id, key_path, patient_key

        try:
            key = patient_key()
        except PatientKeyError as e:
            raise StoreError(str(e)) from None
        with self.engine.connect() as conn:
            recorded = self._meta(conn).get("patient_key_id")
        if recorded is None:
            with self.engine.begin() as conn:
                conn.execute(text("INSERT OR REPLACE INTO meta VALUES ('patient_key_id', :k)"), {"k": key_id(key)})
        elif recorded != key_id(key):
            raise StoreError(f"the index at {self.folder} pseudonymised patients with another key than "
                             f"{key_path()} (key id {recorded}): set {KEY_ENV} to that key's file")
        return key

    def check_model(self, fingerprint: str, dim: int, source: str) -> None:
        """Refuse a model other than the index's; record it if the index has none yet."""
        info = self.model_info
        if info is None:
            with self.engine.begin() as conn:
                conn.execute(text("INSERT OR REPLACE INTO meta VALUES ('model_fingerprint', :f), ('model_dim', :d), "
                                  "('model_source', :s)"), {"f": fingerprint, "d": str(dim), "s": source})
        elif info["fingerprint"] != fingerprint or info["dim"] != dim:
            raise ModelMismatchError.between(self.folder, info, source, fingerprint, dim)

    def generation(self, conn: Connection | None = None) -> int:
        if conn is None:
            with self.engine.connect() as conn:
                return self.generation(conn)
        return int(conn.execute(text("SELECT value FROM meta WHERE key='generation'")).scalar())

    # ---------------------------------------------------------------- reading
    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM images")).scalar())

    def files_under(self, roots: Sequence[Path]) -> dict[str, tuple[int, int, str | None, bool]]:
        """{path: (size, mtime_ns, error, retry)} of the known files under the given folders or files."""
        found: dict[str, tuple[int, int, str | None, bool]] = {}
        with self.engine.connect() as conn:
            for root in roots:
                rows = conn.execute(text("SELECT path, size, mtime_ns, error, retry FROM files WHERE path = :p "
                                         "OR substr(CAST(path AS BLOB), 1, length(:prefix)) = :prefix"),
                                    {"p": _db_path(root), "prefix": _db_prefix(root)})
                found.update({_py_path(row[0]): tuple(row[1:4]) + (bool(row[4]),) for row in rows})
        return found

    def files_at(self, paths: Sequence[str]) -> dict[str, tuple[int, int, str | None, bool]]:
        """{path: (size, mtime_ns, error, retry)} of those of `paths` the index knows."""
        found: dict[str, tuple[int, int, str | None, bool]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(paths), 500):
                chunk = list(paths[start:start + 500])
                rows = conn.execute(text(f"SELECT path, size, mtime_ns, error, retry FROM files WHERE path IN "
                                         f"({', '.join(f':p{i}' for i in range(len(chunk)))})"),
                                    {f"p{i}": _db_path(path) for i, path in enumerate(chunk)})
                found.update({_py_path(row[0]): tuple(row[1:4]) + (bool(row[4]),) for row in rows})
        return found

    def first_image_fields(self, paths: Sequence[str], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
        """{path: {column: value}} of the first image of each of `paths` that has one (columns
        among METADATA_FIELDS)."""
        unknown = set(columns) - set(METADATA_FIELDS)
        if unknown:
            raise ValueError(f"not metadata fields: {sorted(unknown)}")
        found: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(paths), 500):
                chunk = list(paths[start:start + 500])
                rows = conn.execute(text(f"SELECT path, {', '.join(columns)} FROM images WHERE frame = "
                                         f"(SELECT MIN(frame) FROM images AS first WHERE first.path = images.path) "
                                         f"AND path IN ({', '.join(f':p{i}' for i in range(len(chunk)))})"),
                                    {f"p{i}": _db_path(path) for i, path in enumerate(chunk)})
                found.update({_py_path(row[0]): dict(zip(columns, row[1:])) for row in rows})
        return found

    def images_with_hash(self, content_hash: str) -> list[dict[str, Any]]:
        """Stored rows (metadata + embedding) of content already indexed under some path: the
        rows of one such path (a thousand copies must not make the thousand-and-first slow)."""
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM images WHERE path = (SELECT path FROM images WHERE "
                                     "content_hash = :h LIMIT 1) ORDER BY frame"), {"h": content_hash})
            return [dict(r) for r in rows.mappings()]

    def content_hashes(self) -> frozenset[str]:
        """The hashes of all content indexed now (for workers that cannot open the index)."""
        with self.engine.connect() as conn:
            return frozenset(conn.execute(text("SELECT DISTINCT content_hash FROM images")).scalars())

    def skipped(self) -> list[tuple[str, str]]:
        with self.engine.connect() as conn:
            return [(_py_path(path), error) for path, error in conn.execute(
                text("SELECT path, error FROM files WHERE error IS NOT NULL ORDER BY path"))]

    def filter_ids(self, filters: SearchFilters | None) -> np.ndarray | None:
        """Ids of the images matching every filter that is set; None when none is."""
        if not filters:
            return None
        clauses, params = [], {}
        for column, value in (("modality", filters.modality), ("body_part", filters.body_part),
                              ("view_position", filters.view)):
            if value is not None:
                clauses.append(f"{column} = :{column} COLLATE NOCASE")
                params[column] = value
        if filters.since is not None:
            clauses.append("study_date >= :since")
            params["since"] = filters.since.isoformat()
        if filters.until is not None:
            clauses.append("study_date <= :until")
            params["until"] = filters.until.isoformat()
        if filters.under is not None:
            clauses.append("(path = :root OR substr(CAST(path AS BLOB), 1, length(:prefix)) = :prefix)")
            params.update(root=_db_path(filters.under), prefix=_db_prefix(filters.under))
        with self.engine.connect() as conn:
            ids = conn.execute(text(f"SELECT id FROM images WHERE {' AND '.join(clauses)}"), params).scalars().all()
        return np.asarray(ids, dtype=np.int64)

    def values(self, column: str) -> dict[str, int]:
        """{value: images} of one filterable column, most common first (for "no match" messages)."""
        if column not in ("modality", "body_part", "view_position"):
            raise ValueError(column)
        with self.engine.connect() as conn:
            return dict(conn.execute(text(f"SELECT upper({column}), count(*) FROM images WHERE {column} IS NOT NULL "
                                          f"GROUP BY 1 ORDER BY 2 DESC")).all())

    def rows(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """{id: metadata} (path, frame, content_hash and METADATA_FIELDS) for the ids that exist."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        columns = ", ".join(("id", "path", "frame", "content_hash") + METADATA_FIELDS)
        with self.engine.connect() as conn:
            rows = conn.execute(text(f"SELECT {columns} FROM images WHERE id IN ({','.join(map(str, ids))})"))
            return {row["id"]: {k: _py_path(v) if k == "path" else v for k, v in row.items() if k != "id"}
                    for row in rows.mappings()}

    def vectors(self, ids: Sequence[int], conn: Connection | None = None) -> np.ndarray:
        """float32 (len(ids), D), in the order of `ids`."""
        ids = [int(i) for i in ids]
        if conn is None:
            with self.engine.connect() as conn:
                return self.vectors(ids, conn)
        found = dict(conn.execute(text(f"SELECT id, embedding FROM images WHERE id IN "
                                       f"({','.join(map(str, ids)) or 'NULL'})")).all())
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"no images with ids {missing[:5]}")
        return np.stack([np.frombuffer(found[i], dtype=np.float32) for i in ids]) if ids else \
            np.zeros((0, (self.model_info or {}).get("dim", 0)), np.float32)

    def all_vectors(self, conn: Connection) -> tuple[np.ndarray, np.ndarray]:
        ids, blobs = [], []
        for row_id, blob in conn.execute(text("SELECT id, embedding FROM images ORDER BY id")):
            ids.append(row_id)
            blobs.append(blob)
        dim = len(blobs[0]) // 4 if blobs else int((self.model_info or {}).get("dim") or 1)
        vectors = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), dim)
        return np.asarray(ids, dtype=np.int64), vectors

    # ---------------------------------------------------------------- roots and status
    def roots(self) -> list[str]:
        """The folders and files mi-index was given, in order of path."""
        with self.engine.connect() as conn:
            return [_py_path(p) for p in conn.execute(text("SELECT path FROM roots ORDER BY path")).scalars()]

    def record_run(self, roots: Sequence[str | os.PathLike], seconds: float) -> None:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        with self.engine.begin() as conn:
            for root in roots:
                conn.execute(text("INSERT OR REPLACE INTO roots VALUES (:p, :now)"), {"p": _db_path(root), "now": now})
            conn.execute(text("INSERT OR REPLACE INTO meta VALUES ('last_run_at', :now), ('last_run_seconds', :s)"),
                         {"now": now, "s": f"{seconds:.1f}"})

    def remove_root(self, root: str | os.PathLike) -> int:
        """Take a folder (or file, or PACS) out of the index: its files, their images, and the
        root itself. Returns the number of files removed; the FAISS cache follows on write_faiss()."""
        from ..pacs_keys import is_pacs_url

        root = os.fspath(root)
        root = root.rstrip("/") if is_pacs_url(root) else os.path.realpath(root)
        with self.engine.connect() as conn:
            paths = [_py_path(p) for p in conn.execute(
                text("SELECT path FROM files WHERE path = :p OR substr(CAST(path AS BLOB), 1, length(:prefix)) = :prefix"),
                {"p": _db_path(root), "prefix": _db_prefix(root)}).scalars()]
        self.commit(removed=paths)
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM roots WHERE path = :p OR substr(CAST(path AS BLOB), 1, length(:prefix)) "
                              "= :prefix"), {"p": _db_path(root), "prefix": _db_prefix(root)})
        return len(paths)

    def status(self) -> dict[str, Any]:
        """What `mi-index --status` shows: counts, skipped files by reason, folders, model,
        size on disk and the last run."""
        with self.engine.connect() as conn:
            meta = self._meta(conn)
            images = int(conn.execute(text("SELECT count(*) FROM images")).scalar())
            files = int(conn.execute(text("SELECT count(*) FROM files WHERE error IS NULL")).scalar())
            skipped = dict(conn.execute(text("SELECT error, count(*) FROM files WHERE error IS NOT NULL "
                                             "GROUP BY error ORDER BY count(*) DESC")).all())
            modalities = dict(conn.execute(text("SELECT coalesce(modality, ''), count(*) FROM images "
                                                "GROUP BY 1 ORDER BY 2 DESC")).all())
        size = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())
        return {"index": str(self.folder), "images": images, "files": files, "skipped": skipped,
                "modalities": modalities, "folders": self.roots(), "model": self.model_info,
                "size_bytes": size, "last_run_at": meta.get("last_run_at"),
                "last_run_seconds": float(meta["last_run_seconds"]) if meta.get("last_run_seconds") else None,
                "schema_version": int(meta.get("schema_version", 0))}

    # ---------------------------------------------------------------- the FAISS cache
    @property
    def index_id(self) -> str:
        with self.engine.connect() as conn:
            return self._meta(conn)["index_id"]

    def _faiss_path(self, generation: int, index_id: str) -> Path:
        return self.folder / f"vectors.{index_id}.g{generation}.faiss"

    def _cache_files(self, index_id: str) -> list[Path]:
        """This database's cache files, oldest generation first."""
        prefix = f"vectors.{index_id}.g"
        return sorted((p for p in self.folder.glob(f"{prefix}*.faiss") if p.name[len(prefix):-6].isdigit()),
                      key=lambda p: int(p.name[len(prefix):-6]))

    def load_faiss(self):
        """The FAISS index of the current state: the cached file when it is this database's, of
        this generation and intact, else an older cached file brought up to date, else built
        from SQLite; all inside one read transaction (a consistent snapshot, even while
        mi-index writes)."""
        return self.load_faiss_with_generation()[0]

    def load_faiss_with_generation(self) -> tuple[Any, int]:
        """`load_faiss()` and the generation it is of (read in the same snapshot)."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")  # a read snapshot: generation and vectors agree
            meta = self._meta(conn)
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
        import faiss

        if not path.exists():
            return None
        recorded = meta.get("faiss_digest", "")
        if recorded.startswith(path.name + ":") and recorded != f"{path.name}:{_file_digest(path)}":
            return None  # damaged since it was written (a flipped bit, a truncated copy)
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, ValueError, MemoryError):
            return None
        dim = int(meta.get("model_dim") or index.d)
        count, total, largest = conn.execute(text("SELECT count(*), coalesce(sum(id), 0), coalesce(max(id), -1) "
                                                  "FROM images")).one()
        ids = _faiss_ids(index)
        held = (len(ids), int(ids.sum()) if len(ids) else 0, int(ids.max()) if len(ids) else -1)
        if index.d != dim or index.ntotal != count or held != (count, total, largest):
            return None
        return index

    def write_faiss(self) -> Path:
        """Write the FAISS file of the current generation atomically (tmp, fsync, rename), record
        its digest, and remove every other cache file. An existing file of this generation is
        kept only when it verifies: an unchanged re-run repairs a damaged cache."""
        import faiss

        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")
            meta = self._meta(conn)
            target = self._faiss_path(int(meta["generation"]), meta["index_id"])
            intact = self._read_verified(target, meta, conn) is not None
            if not intact:
                index = self._current_index(conn, use_cache=not target.exists())  # damaged: from SQLite alone
                tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
                try:
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
        if not intact or not meta.get("faiss_digest", "").startswith(target.name + ":"):
            with self.engine.begin() as conn:
                conn.execute(text("INSERT OR REPLACE INTO meta VALUES ('faiss_digest', :d)"),
                             {"d": f"{target.name}:{_file_digest(target)}"})
        for old in self.folder.glob("vectors.*"):  # older generations, other databases', tmp files of killed runs
            if old != target:
                old.unlink(missing_ok=True)
        return target

    def _current_index(self, conn: Connection, use_cache: bool = True):
        """The index of what `conn` sees: this database's newest older FAISS file updated by the
        difference (row ids are never reused and rows never change, so ids say what to add and
        remove), or, when there is none or the collection changed too much, built from all
        vectors."""
        import faiss

        from . import vectors as vector_index
        db_ids = np.asarray(conn.execute(text("SELECT id FROM images ORDER BY id")).scalars().all(), np.int64)
        meta = self._meta(conn)
        older = self._cache_files(meta["index_id"]) if use_cache else []
        recorded = meta.get("faiss_digest", "")
        try:
            if older and recorded.startswith(older[-1].name + ":") and \
                    recorded != f"{older[-1].name}:{_file_digest(older[-1])}":
                older = []  # damaged since it was written
            index = faiss.read_index(str(older[-1])) if older else None
        except (OSError, RuntimeError, ValueError, MemoryError):  # removed meanwhile by a newer write, or damaged
            index = None
        if index is not None and index.d != int(meta.get("model_dim") or index.d):
            index = None
        if index is not None:
            cached = np.sort(_faiss_ids(index))
            gone, new = np.setdiff1d(cached, db_ids), np.setdiff1d(db_ids, cached)
            same_kind = vector_index.index_kind(index) == vector_index.choose_kind(
                len(db_ids), index.d, self._memory_budget(meta))
            if same_kind and len(new) <= max(len(cached) - len(gone), 0):  # IVF lists trained on most of it
                if len(gone):
                    index.remove_ids(faiss.IDSelectorBatch(gone))
                if len(new):
                    index.add_with_ids(self.vectors(new.tolist(), conn), new)
                return index
        ids, vectors = self.all_vectors(conn)
        return vector_index.build_faiss_index(vectors, ids, memory_budget=self._memory_budget(meta))

    @staticmethod
    def _memory_budget(meta: dict[str, str]) -> int | None:
        return int(meta["faiss_memory_bytes"]) if meta.get("faiss_memory_bytes") else None

    def set_faiss_memory(self, gigabytes: float | None) -> None:
        """Keep the FAISS index within this many GB from now on (None: no budget): flat, IVF
        fp16 or IVF-PQ, whichever fits (indexer.vectors.choose_kind). A change rebuilds it."""
        value = str(int(gigabytes * 1e9)) if gigabytes else None
        with self.engine.begin() as conn:
            if self._meta(conn).get("faiss_memory_bytes") == value:
                return
            if value is None:
                conn.execute(text("DELETE FROM meta WHERE key = 'faiss_memory_bytes'"))
            else:
                conn.execute(text("INSERT OR REPLACE INTO meta VALUES ('faiss_memory_bytes', :v)"), {"v": value})
            conn.execute(text("DELETE FROM meta WHERE key = 'faiss_digest'"))
        for cached in self.folder.glob("vectors.*"):  # built for the old budget
            cached.unlink(missing_ok=True)

    # ---------------------------------------------------------------- writing (one transaction per call)
    def commit(self, indexed: Sequence[dict[str, Any]] = (), skipped: Sequence[dict[str, Any]] = (),
               removed: Sequence[str] = ()) -> None:
        """One transaction: files indexed (with their images), skipped (with the reason) and removed.

        `indexed` items: {path, size, mtime_ns, content_hash, images: [{frame, embedding, **metadata}]}.
        `skipped` items: {path, size, mtime_ns, content_hash (or None), error, retry (optional:
        true for a failure of the run, not the file, so that the next run tries it again)}."""
        if not (indexed or skipped or removed):
            return
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        columns = ("path", "frame", "content_hash") + METADATA_FIELDS + ("embedding",)
        insert_image = text(f"INSERT INTO images ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})")
        upsert_file = text("INSERT OR REPLACE INTO files (path, size, mtime_ns, content_hash, error, indexed_at, retry) "
                           "VALUES (:path, :size, :mtime_ns, :content_hash, :error, :now, :retry)")
        with self.engine.begin() as conn:
            for path in removed:
                conn.execute(text("DELETE FROM images WHERE path = :p"), {"p": _db_path(path)})
                conn.execute(text("DELETE FROM files WHERE path = :p"), {"p": _db_path(path)})
            files = list(indexed) + list(skipped)
            if files:  # one statement each for the whole batch: per-file statements cost more than SQLite
                conn.execute(text("DELETE FROM images WHERE path = :p"), [{"p": _db_path(item["path"])} for item in files])
                conn.execute(upsert_file, [{"path": _db_path(item["path"]), "size": item["size"],
                                            "mtime_ns": item["mtime_ns"], "content_hash": item.get("content_hash"),
                                            "error": item.get("error"), "now": now,
                                            "retry": int(bool(item.get("retry")))} for item in files])
            image_rows = [
                {**{c: image.get(c) for c in METADATA_FIELDS}, "path": _db_path(item["path"]), "frame": image["frame"],
                 "content_hash": item["content_hash"],
                 "embedding": np.ascontiguousarray(image["embedding"], dtype=np.float32).tobytes()}
                for item in indexed for image in item["images"]
            ]
            if image_rows:
                conn.execute(insert_image, image_rows)
            conn.execute(text("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"))


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
    import faiss

    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
             for i in range(ivf.nlist) if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
