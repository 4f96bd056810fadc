"""The index folder: SQLite (the source of truth) and a FAISS file (a cache of it).

    INDEX_DIR/
      index.sqlite            schema below; every embedding is stored here as a float32 blob
      vectors.g<N>.faiss      the FAISS index of generation N, rebuilt from SQLite when stale
      index.lock              held by the one mi-index that may write at a time

Each committed batch bumps `generation`. A FAISS file is used only when its generation is
the database's, so a reader never sees vectors that SQLite does not hold (and the other
way round); otherwise the reader builds the index from SQLite inside one read
transaction, a consistent snapshot even while mi-index is writing. Row ids are never
reused (AUTOINCREMENT), and they are the FAISS ids.
"""
from __future__ import annotations

import datetime as dt
import os
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.pool import QueuePool

INDEX_ENV = "MI_INDEX"
DB_NAME = "index.sqlite"
METADATA_FIELDS = ("width", "height", "source_format", "sop_instance_uid", "study_instance_uid",
                   "series_instance_uid", "modality", "body_part", "view_position", "study_date",
                   "series_description", "patient_sex", "patient_age", "patient_hash")


class StoreError(Exception):
    """Base class: the index cannot be used as asked. The message says how to fix it."""


class IndexNotFoundError(StoreError):
    pass


class IndexFormatError(StoreError):
    pass


class ModelMismatchError(StoreError):
    pass


class IndexBusyError(StoreError):
    pass


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


def default_index_dir() -> Path:
    """MI_INDEX if set, else the per-user data folder (e.g. ~/.local/share/medimageinsight-search/index)."""
    if os.environ.get(INDEX_ENV):
        return Path(os.environ[INDEX_ENV]).expanduser()
    import platformdirs
    return Path(platformdirs.user_data_dir("medimageinsight-search")) / "index"


# --- schema: numbered migrations, applied in order; `meta.schema_version` says how far ------------

def _m001_initial(conn: Connection) -> None:
    conn.execute(text("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"))
    conn.execute(text("""
        CREATE TABLE files (            -- every file seen under an indexed folder
            path TEXT PRIMARY KEY,      -- absolute, symlinks resolved
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            content_hash TEXT,
            error TEXT,                 -- NULL: indexed; else why the file was skipped
            indexed_at TEXT NOT NULL
        )"""))
    conn.execute(text("""
        CREATE TABLE images (           -- one row per indexed image (a DICOM frame, a TIFF page)
            id INTEGER PRIMARY KEY AUTOINCREMENT,   -- the FAISS id; never reused
            path TEXT NOT NULL REFERENCES files(path) ON DELETE CASCADE,
            frame INTEGER NOT NULL,
            content_hash TEXT NOT NULL,
            width INTEGER, height INTEGER, source_format TEXT,
            sop_instance_uid TEXT, study_instance_uid TEXT, series_instance_uid TEXT,
            modality TEXT, body_part TEXT, view_position TEXT, study_date TEXT,
            series_description TEXT, patient_sex TEXT, patient_age TEXT,
            patient_hash TEXT,          -- salted hash of PatientID; names and birth dates are never stored
            embedding BLOB NOT NULL,    -- float32, L2-normalised
            UNIQUE (path, frame)
        )"""))
    conn.execute(text("CREATE INDEX images_by_hash ON images (content_hash)"))
    conn.execute(text("CREATE INDEX images_by_modality ON images (modality COLLATE NOCASE)"))
    conn.execute(text("CREATE INDEX images_by_study_date ON images (study_date)"))
    conn.execute(text("INSERT INTO meta VALUES ('generation', '0'), ('patient_salt', :salt)"),
                 {"salt": secrets.token_hex(16)})


MIGRATIONS = [_m001_initial]
SCHEMA_VERSION = len(MIGRATIONS)


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
                raise IndexFormatError(f"cannot create the index folder {folder}: {e.strerror}") from None
        uri = sqlite_uri(db, mode="ro") if readonly else sqlite_uri(db)
        # The connection is made by `creator`, never from a URL: SQLAlchemy would parse `?`
        # and `#` in the folder's name as parts of its own URL.
        engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
                               poolclass=QueuePool)
        event.listen(engine, "connect", _connect_pragmas)
        store = cls(folder, engine, readonly)
        try:
            with engine.begin() as conn:
                if not readonly:
                    conn.exec_driver_sql("PRAGMA journal_mode = WAL")
                    # DDL runs in autocommit under Python's sqlite3 unless a transaction is opened
                    # explicitly: a migration killed halfway must leave nothing behind.
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                store._migrate(conn)
        except (DatabaseError, OperationalError) as e:
            engine.dispose()
            raise IndexFormatError(f"{db} is not a usable index ({e.orig}); move it away and run mi-index again") \
                from None
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
        self._lock_file = open(self.folder / "index.lock", "w")
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

    @property
    def patient_salt(self) -> str:
        with self.engine.connect() as conn:
            return self._meta(conn)["patient_salt"]

    def check_model(self, fingerprint: str, dim: int, source: str) -> None:
        """Refuse a model other than the index's; record it if the index has none yet."""
        info = self.model_info
        if info is None:
            with self.engine.begin() as conn:
                conn.execute(text("INSERT OR REPLACE INTO meta VALUES ('model_fingerprint', :f), ('model_dim', :d), "
                                  "('model_source', :s)"), {"f": fingerprint, "d": str(dim), "s": source})
        elif info["fingerprint"] != fingerprint or info["dim"] != dim:
            raise ModelMismatchError(
                f"the index at {self.folder} was built with another model ({info['source']}, fingerprint "
                f"{info['fingerprint'][:12]}), not {source} (fingerprint {fingerprint[:12]}): use --model "
                f"{info['source']}, or another --index for this model")

    def generation(self, conn: Connection | None = None) -> int:
        if conn is None:
            with self.engine.connect() as conn:
                return self.generation(conn)
        return int(conn.execute(text("SELECT value FROM meta WHERE key='generation'")).scalar())

    # ---------------------------------------------------------------- reading
    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM images")).scalar())

    def files_under(self, roots: Sequence[Path]) -> dict[str, tuple[int, int, str | None]]:
        """{path: (size, mtime_ns, error)} of the known files under the given folders or files."""
        found: dict[str, tuple[int, int, str | None]] = {}
        with self.engine.connect() as conn:
            for root in roots:
                rows = conn.execute(text("SELECT path, size, mtime_ns, error FROM files WHERE path = :p "
                                         "OR substr(path, 1, length(:prefix)) = :prefix"),
                                    {"p": str(root), "prefix": str(root).rstrip(os.sep) + os.sep})
                found.update({path: (size, mtime, error) for path, size, mtime, error in rows})
        return found

    def files_at(self, paths: Sequence[str]) -> dict[str, tuple[int, int, str | None]]:
        """{path: (size, mtime_ns, error)} of those of `paths` the index knows."""
        found: dict[str, tuple[int, int, str | None]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(paths), 500):
                chunk = list(paths[start:start + 500])
                rows = conn.execute(text(f"SELECT path, size, mtime_ns, error FROM files WHERE path IN "
                                         f"({', '.join(f':p{i}' for i in range(len(chunk)))})"),
                                    {f"p{i}": path for i, path in enumerate(chunk)})
                found.update({path: (size, mtime, error) for path, size, mtime, error in rows})
        return found

    def images_with_hash(self, content_hash: str) -> list[dict[str, Any]]:
        """Stored rows (metadata + embedding) of content already indexed under some path: the
        rows of one such path (a thousand copies must not make the thousand-and-first slow)."""
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM images WHERE path = (SELECT path FROM images WHERE "
                                     "content_hash = :h LIMIT 1) ORDER BY frame"), {"h": content_hash})
            return [dict(r) for r in rows.mappings()]

    def skipped(self) -> list[tuple[str, str]]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text("SELECT path, error FROM files WHERE error IS NOT NULL "
                                                        "ORDER BY path"))]

    def filter_ids(self, *, modality: str | None = None, body_part: str | None = None, view: str | None = None,
                   since: dt.date | None = None, until: dt.date | None = None,
                   under: str | os.PathLike | None = None) -> np.ndarray | None:
        """Ids of the images matching every given filter (DICOM values compared case-insensitively;
        study dates inclusive); None when no filter is given."""
        clauses, params = [], {}
        for column, value in (("modality", modality), ("body_part", body_part), ("view_position", view)):
            if value is not None:
                clauses.append(f"{column} = :{column} COLLATE NOCASE")
                params[column] = value
        if since is not None:
            clauses.append("study_date >= :since")
            params["since"] = since.isoformat()
        if until is not None:
            clauses.append("study_date <= :until")
            params["until"] = until.isoformat()
        if under is not None:
            root = str(Path(under).expanduser().resolve())
            clauses.append("(path = :root OR substr(path, 1, length(:prefix)) = :prefix)")
            params.update(root=root, prefix=root.rstrip(os.sep) + os.sep)
        if not clauses:
            return None
        with self.engine.connect() as conn:
            ids = conn.execute(text(f"SELECT id FROM images WHERE {' AND '.join(clauses)}"), params).scalars().all()
        return np.asarray(ids, dtype=np.int64)

    def rows(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """{id: metadata} (path, frame and METADATA_FIELDS) for the ids that exist."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        columns = ", ".join(("id", "path", "frame") + METADATA_FIELDS)
        with self.engine.connect() as conn:
            rows = conn.execute(text(f"SELECT {columns} FROM images WHERE id IN ({','.join(map(str, ids))})"))
            return {row["id"]: {k: v for k, v in row.items() if k != "id"} for row in rows.mappings()}

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

    # ---------------------------------------------------------------- the FAISS cache
    def _faiss_path(self, generation: int) -> Path:
        return self.folder / f"vectors.g{generation}.faiss"

    def load_faiss(self):
        """The FAISS index of the current state: the cached file when it is of this generation,
        else an older cached file brought up to date, else built from SQLite; all inside one
        read transaction (a consistent snapshot, even while mi-index writes)."""
        import faiss

        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")  # a read snapshot: generation and vectors agree
            cached = self._faiss_path(self.generation(conn))
            if cached.exists():
                try:
                    return faiss.read_index(str(cached))
                except RuntimeError:
                    pass  # unreadable cache: rebuild below
            return self._current_index(conn)

    def write_faiss(self) -> Path:
        """Write the FAISS file of the current generation atomically (tmp, fsync, rename) and
        remove older ones. Readers pick it up by generation."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")
            target = self._faiss_path(self.generation(conn))
            if not target.exists():  # else up to date: an unchanged re-run reads no vectors
                import faiss
                tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
                faiss.write_index(self._current_index(conn), str(tmp))
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, target)
        for old in self.folder.glob("vectors.g*"):  # older generations, and tmp files of killed runs
            if old != target:
                old.unlink(missing_ok=True)
        return target

    def _current_index(self, conn: Connection):
        """The index of what `conn` sees: the newest older FAISS file updated by the difference
        (row ids are never reused and rows never change, so ids say what to add and remove),
        or, when there is none or the collection changed too much, built from all vectors."""
        import faiss

        from . import vectors as vector_index
        db_ids = np.asarray(conn.execute(text("SELECT id FROM images ORDER BY id")).scalars().all(), np.int64)
        older = sorted(self.folder.glob("vectors.g*.faiss"), key=lambda p: int(p.stem[len("vectors.g"):] or 0))
        try:
            index = faiss.read_index(str(older[-1])) if older else None
        except (RuntimeError, ValueError):  # removed meanwhile by a newer write, or damaged
            index = None
        if index is not None:
            cached = np.sort(_faiss_ids(index))
            gone, new = np.setdiff1d(cached, db_ids), np.setdiff1d(db_ids, cached)
            flat = vector_index.index_kind(index) == "flat"
            same_kind = flat == (len(db_ids) <= vector_index.FLAT_MAX_VECTORS)
            if same_kind and len(new) <= max(len(cached) - len(gone), 0):  # IVF lists trained on most of it
                if len(gone):
                    index.remove_ids(faiss.IDSelectorBatch(gone))
                if len(new):
                    index.add_with_ids(self.vectors(new.tolist(), conn), new)
                return index
        ids, vectors = self.all_vectors(conn)
        return vector_index.build_faiss_index(vectors, ids)

    # ---------------------------------------------------------------- writing (one transaction per call)
    def commit(self, indexed: Sequence[dict[str, Any]] = (), skipped: Sequence[dict[str, Any]] = (),
               removed: Sequence[str] = ()) -> None:
        """One transaction: files indexed (with their images), skipped (with the reason) and removed.

        `indexed` items: {path, size, mtime_ns, content_hash, images: [{frame, embedding, **metadata}]}.
        `skipped` items: {path, size, mtime_ns, content_hash (or None), error}."""
        if not (indexed or skipped or removed):
            return
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        columns = ("path", "frame", "content_hash") + METADATA_FIELDS + ("embedding",)
        insert_image = text(f"INSERT INTO images ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})")
        upsert_file = text("INSERT OR REPLACE INTO files VALUES (:path, :size, :mtime_ns, :content_hash, :error, :now)")
        with self.engine.begin() as conn:
            for path in removed:
                conn.execute(text("DELETE FROM images WHERE path = :p"), {"p": path})
                conn.execute(text("DELETE FROM files WHERE path = :p"), {"p": path})
            for item in list(indexed) + list(skipped):
                conn.execute(text("DELETE FROM images WHERE path = :p"), {"p": item["path"]})
                conn.execute(upsert_file, {"path": item["path"], "size": item["size"], "mtime_ns": item["mtime_ns"],
                                           "content_hash": item.get("content_hash"), "error": item.get("error"),
                                           "now": now})
            image_rows = [
                {**{c: image.get(c) for c in METADATA_FIELDS}, "path": item["path"], "frame": image["frame"],
                 "content_hash": item["content_hash"],
                 "embedding": np.ascontiguousarray(image["embedding"], dtype=np.float32).tobytes()}
                for item in indexed for image in item["images"]
            ]
            if image_rows:
                conn.execute(insert_image, image_rows)
            conn.execute(text("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"))


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
