"""Writing the index, one transaction per call: files indexed, skipped and removed (each commit
a new generation), the roots mi-index was given, and the record of a run."""
from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from .database import execute_many_raw, raw_errors
from .reads import METADATA_FIELDS
from .series import refresh_series, series_at_paths, series_of_rows, series_where
from .sql import at_or_under, db_path, py_path, rows_at_paths, set_meta
from .vector_file import VectorFile, id_runs

_IMAGE_COLUMNS = ("id", "path", "frame", "content_hash") + METADATA_FIELDS
_INSERT_IMAGE = (f"INSERT INTO images ({', '.join(_IMAGE_COLUMNS)}) "
                     f"VALUES ({', '.join(':' + c for c in _IMAGE_COLUMNS)})")
_UPSERT_FILE = ("INSERT OR REPLACE INTO files (path, size, mtime_ns, content_hash, error, indexed_at, retry) "
                    "VALUES (:path, :size, :mtime_ns, :content_hash, :error, :now, :retry)")


def under_or_at(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Writes:
    """The writing half of IndexStore (`engine` and `vector_file` are the store's)."""

    engine: Engine
    vector_file: VectorFile

    def commit(self, indexed: Sequence[dict[str, Any]] = (), skipped: Sequence[dict[str, Any]] = (),
               removed: Sequence[str] = ()) -> None:
        """One transaction: files indexed (with their images), skipped (with the reason) and removed.

        `indexed` items: {path, size, mtime_ns, content_hash, images: [{frame, embedding, **metadata}]}.
        `skipped` items: {path, size, mtime_ns, content_hash (or None), error, retry (optional:
        true for a failure of the run, not the file, so that the next run tries it again)}."""
        if not (indexed or skipped or removed):
            return
        now = _now()
        with raw_errors(self.engine), self.engine.begin() as conn:  # statements beneath SQLAlchemy too
            paths = [item["path"] for item in (*indexed, *skipped)] + list(removed)
            touched = series_at_paths(conn, [db_path(path) for path in paths])
            replaced = [row[0] for row in rows_at_paths(conn, "SELECT id FROM images WHERE path IN", paths)]
            for path in removed:
                conn.execute(text("DELETE FROM images WHERE path = :p"), {"p": db_path(path)})
                conn.execute(text("DELETE FROM files WHERE path = :p"), {"p": db_path(path)})
            files = list(indexed) + list(skipped)
            if files:  # one statement each for the whole batch: per-file statements cost more than SQLite
                execute_many_raw(conn, "DELETE FROM images WHERE path = :p",
                                 [{"p": db_path(item["path"])} for item in files])
                execute_many_raw(conn, _UPSERT_FILE, [{"path": db_path(item["path"]), "size": item["size"],
                                                       "mtime_ns": item["mtime_ns"],
                                                       "content_hash": item.get("content_hash"),
                                                       "error": item.get("error"), "now": now,
                                                       "retry": int(bool(item.get("retry")))} for item in files])
            images = [(item, image) for item in indexed for image in item["images"]]
            first = _next_image_id(conn)
            image_rows = [
                {**{c: image.get(c) for c in METADATA_FIELDS}, "id": first + n, "path": db_path(item["path"]),
                 "frame": image["frame"], "content_hash": item["content_hash"]}
                for n, (item, image) in enumerate(images)
            ]
            if image_rows:
                execute_many_raw(conn, _INSERT_IMAGE, image_rows)
                # on disk before the commit that makes the rows visible (indexer.store.vector_file)
                self.vector_file.write(np.arange(first, first + len(images)),
                                       np.stack([np.asarray(image["embedding"], np.float32) for _, image in images]))
            refresh_series(conn, touched | series_of_rows(image_rows), self.vector_file.read)
            _mark_for_clearing(conn, replaced)
            conn.execute(text("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"))
        self.clear_removed_vectors()

    def clear_removed_vectors(self) -> None:
        """Punch out the vectors of rows deleted by committed transactions (meta.vectors_to_clear),
        then drop the record: after every write, and on taking the lock (a writer killed between
        its commit and this)."""
        with self.engine.connect() as conn:
            pending = conn.execute(text("SELECT value FROM meta WHERE key = 'vectors_to_clear'")).scalar()
        if not pending:
            return
        self.vector_file.clear([tuple(run) for run in json.loads(pending)])
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM meta WHERE key = 'vectors_to_clear' AND value = :v"), {"v": pending})

    def record_run(self, roots: Sequence[str | os.PathLike], seconds: float) -> None:
        now = _now()
        with self.engine.begin() as conn:
            for root in roots:
                conn.execute(text("INSERT OR REPLACE INTO roots VALUES (:p, :now)"), {"p": db_path(root), "now": now})
            lifted = [path for path in map(py_path, conn.execute(text("SELECT path FROM excluded")).scalars())
                      if any(under_or_at(os.fspath(root), path) for root in roots)]
            conn.execute(text("DELETE FROM excluded WHERE path = :p"), [{"p": db_path(p)} for p in lifted] or [{"p": None}])
            set_meta(conn, {"last_run_at": now, "last_run_seconds": f"{seconds:.1f}"})

    def remove_root(self, root: str | os.PathLike) -> int:
        """`remove_roots` of one folder (or file, or PACS)."""
        return self.remove_roots([root])

    def remove_roots(self, roots: Sequence[str | os.PathLike]) -> int:
        """Take folders (or files, or PACS) out of the index: their files, their images, and the
        roots themselves, in one transaction (a kill leaves all of it or none; and one commit, not
        one per root: at 300k images, ten folders of 1% each took 11.2 s in ten commits, 5.2 s in
        one, the commit's WAL write and checkpoint being most of it). A folder under a folder still
        indexed is recorded as excluded from it, so that `--update` leaves it out. Returns the
        number of files removed; the FAISS cache follows on write_faiss()."""
        # SQLite as Debian builds it zeroes every page it frees (secure_delete): a removed image's
        # vector and metadata do not stay in the file. It costs one page written per image (30k
        # removed at 300k: 46k WAL frames instead of 15k, 5.2 s instead of 4.1 with it off); kept.
        with raw_errors(self.engine), self.engine.begin() as conn:  # its DELETE ... RETURNING runs beneath SQLAlchemy
            gone: list[int] = []
            removed = sum(_remove_one(conn, root, self.vector_file, gone) for root in roots)
            _mark_for_clearing(conn, gone)  # once for all the roots: the record is rewritten whole
            conn.execute(text("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"))
        self.clear_removed_vectors()
        return removed


def _next_image_id(conn: Connection) -> int:
    """The id the next image row gets: as AUTOINCREMENT would give it (never one used before),
    chosen here so that its vector can be written before the commit."""
    raw = conn.connection.driver_connection
    sequence = raw.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
    largest = raw.execute("SELECT max(id) FROM images").fetchone()[0]
    return max(sequence[0] if sequence else 0, largest or 0) + 1


def _mark_for_clearing(conn: Connection, ids: Sequence[int]) -> None:
    """Record in this transaction that the vectors of deleted rows `ids` are to be cleared."""
    if not len(ids):
        return
    pending = conn.execute(text("SELECT value FROM meta WHERE key = 'vectors_to_clear'")).scalar()
    runs = json.loads(pending or "[]") + [list(run) for run in id_runs(ids)]
    set_meta(conn, {"vectors_to_clear": json.dumps(runs)})


def _remove_one(conn: Connection, root: str | os.PathLike, vector_file: VectorFile, gone: list[int]) -> int:
    """Delete one root's files, images, record and exclusions in `conn`'s transaction; the number
    of files it held. The deleted images' ids are added to `gone`."""
    from ..pacs_keys import is_pacs_url

    root = os.fspath(root)
    root = root.rstrip("/") if is_pacs_url(root) else os.path.realpath(root)
    where, params = at_or_under(root)
    touched = series_where(conn, where, params)
    removed = int(conn.execute(text(f"SELECT count(*) FROM files WHERE {where}"), params).scalar())
    raw = conn.connection.driver_connection
    gone += [row[0] for row in raw.execute(f"DELETE FROM images WHERE {where} RETURNING id", params)]  # a range
    conn.execute(text(f"DELETE FROM files WHERE {where}"), params)
    conn.execute(text(f"DELETE FROM roots WHERE {where}"), params)
    conn.execute(text(f"DELETE FROM excluded WHERE {where}"), params)
    above = [p for p in map(py_path, conn.execute(text("SELECT path FROM roots")).scalars())
             if p != root and under_or_at(root, p)]
    if above:
        conn.execute(text("INSERT OR REPLACE INTO excluded VALUES (:p, :root)"),
                     {"p": db_path(root), "root": db_path(max(above, key=len))})
    refresh_series(conn, touched, vector_file.read)
    return removed
