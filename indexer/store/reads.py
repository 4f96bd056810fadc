"""Reading the index: files and their version records, image rows and metadata, vectors, the
ids a search filter allows, and what `mi-index --status` shows."""
from __future__ import annotations

import gc
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from .database import fetch_raw
from .identity import read_meta
from .sql import at_or_under, between, py_path, rows_at_paths
from .vector_file import VectorFile

if TYPE_CHECKING:
    from ..filters import SearchFilters

METADATA_FIELDS = ("width", "height", "source_format", "sop_instance_uid", "study_instance_uid",
                   "series_instance_uid", "modality", "body_part", "view_position", "study_date",
                   "series_description", "patient_sex", "patient_age", "patient_hash")
FileRecord = tuple[int, int, "str | None", bool]  # (size, mtime_ns, error, retry)


class ContentLookup:
    """Whether some content is indexed, asked from a decoding worker: a read-only connection of
    its own, opened in the process that asks (an engine does not cross a fork or a pickle)."""

    def __init__(self, db: Path):
        self.db = db
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"db": self.db, "_conn": None, "_pid": -1}

    def __contains__(self, digest: str) -> bool:
        if self._conn is None or self._pid != os.getpid():
            from .database import sqlite_uri
            self._conn = sqlite3.connect(sqlite_uri(self.db, mode="ro"), uri=True, timeout=30)
            self._pid = os.getpid()
        query = "SELECT 1 FROM images WHERE content_hash = ? LIMIT 1"
        return self._conn.execute(query, (digest,)).fetchone() is not None


def raw_ids(conn: Connection, query: str, params: dict[str, Any] | tuple = ()) -> np.ndarray:
    """The int64 first column of `query` (named `:params`), fetched through the sqlite3 connection
    beneath SQLAlchemy: a million ids as Row objects cost 69 ms, raw tuples 24. The garbage collector
    is held off meanwhile: a million new tuples would start it, and with torch loaded (the server)
    every run walks its objects too (twice the time)."""
    raw = conn.connection.driver_connection
    enabled = gc.isenabled()
    gc.disable()
    try:
        found = raw.execute(query, params).fetchall()
        return np.fromiter((row[0] for row in found), dtype=np.int64, count=len(found))
    finally:
        if enabled:
            gc.enable()


def filter_clause(filters: SearchFilters | None) -> tuple[str, dict[str, Any]]:
    """The WHERE clause over `images` (and its parameters) that lets through the images matching every filter
    that is set ("1" when none is): the one SQL of the filters, for searches and the page's facets alike."""
    clauses, params = [], {}
    for field, value in filters.set() if filters else ():  # each FILTER_FIELDS entry names its column and comparison
        if field.compare == "equal":
            clauses.append(f"{field.column} = :{field.name} COLLATE NOCASE")
            params[field.name] = value
        elif field.compare in ("from", "to"):
            clauses.append(f"{field.column} {'>=' if field.compare == 'from' else '<='} :{field.name}")
            params[field.name] = value.isoformat()
        else:  # under: the folder itself or any path below it, compared as bytes
            under, under_params = at_or_under(value)  # field.column is path
            clauses.append(under)
            params.update(under_params)
    return " AND ".join(clauses) or "1", params


class Reads:
    """The reading half of IndexStore (`engine`, `folder` and `vector_file` are the store's)."""

    engine: Engine
    folder: Path
    vector_file: VectorFile

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM images")).scalar())

    def files_under(self, roots: Sequence[Path | str]) -> dict[str, FileRecord]:
        """{path: (size, mtime_ns, error, retry)} of the known files under the given folders or files."""
        return self._file_records([at_or_under(root) for root in roots])

    def files_between(self, ranges: Sequence[tuple[bytes, bytes]]) -> dict[str, FileRecord]:
        """`files_under`'s records of the paths whose bytes lie in one of `ranges` ([low, high))."""
        return self._file_records([between(low, high) for low, high in ranges])

    def _file_records(self, clauses: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, FileRecord]:
        found: dict[str, FileRecord] = {}
        with self.engine.connect() as conn:
            raw = conn.connection.driver_connection  # SQLAlchemy rows cost more than the lookup (100k files)
            for where, params in clauses:
                rows = raw.execute(f"SELECT path, size, mtime_ns, error, retry FROM files WHERE {where}", params)
                found.update({(path if isinstance(path, str) else py_path(path)): (size, mtime, error, bool(retry))
                              for path, size, mtime, error, retry in rows})
        return found

    def files_at(self, paths: Sequence[str]) -> dict[str, FileRecord]:
        """{path: (size, mtime_ns, error, retry)} of those of `paths` the index knows."""
        with self.engine.connect() as conn:
            rows = rows_at_paths(conn, "SELECT path, size, mtime_ns, error, retry FROM files WHERE path IN", paths)
            return {py_path(row[0]): tuple(row[1:4]) + (bool(row[4]),) for row in rows}

    def first_image_fields(self, paths: Sequence[str], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
        """{path: {column: value}} of the first image of each of `paths` that has one (columns
        among METADATA_FIELDS)."""
        unknown = set(columns) - set(METADATA_FIELDS)
        if unknown:
            raise ValueError(f"not metadata fields: {sorted(unknown)}")
        with self.engine.connect() as conn:
            rows = rows_at_paths(conn, f"SELECT path, {', '.join(columns)} FROM images WHERE frame = "
                                       f"(SELECT MIN(frame) FROM images AS first WHERE first.path = images.path) "
                                       f"AND path IN", paths)
            return {py_path(row[0]): dict(zip(columns, row[1:])) for row in rows}

    def images_with_hash(self, content_hash: str) -> list[dict[str, Any]]:
        """Stored rows (metadata and `embedding`, float32) of content already indexed under some
        path: the rows of one such path (a thousand copies must not make the thousand-and-first slow)."""
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(text(
                "SELECT * FROM images WHERE path = (SELECT path FROM images WHERE content_hash = :h LIMIT 1) "
                "ORDER BY frame"), {"h": content_hash}).mappings()]
        vectors = self.vector_file.read([row["id"] for row in rows]) if rows else ()
        return [{**row, "embedding": vector} for row, vector in zip(rows, vectors)]

    def content_hashes(self) -> frozenset[str]:
        """The hashes of all content indexed now (for workers that cannot open the index)."""
        with self.engine.connect() as conn:
            return frozenset(conn.execute(text("SELECT DISTINCT content_hash FROM images")).scalars())

    def content_lookup(self) -> ContentLookup:
        """Whether content is indexed, for decoding workers on this machine (`digest in lookup`)."""
        from .database import DB_NAME
        return ContentLookup(self.folder / DB_NAME)

    def skipped(self) -> list[tuple[str, str]]:
        with self.engine.connect() as conn:
            return [(py_path(path), error) for path, error in conn.execute(
                text("SELECT path, error FROM files WHERE error IS NOT NULL ORDER BY path"))]

    def filter_ids(self, filters: SearchFilters | None) -> np.ndarray | None:
        """Ids of the images matching every filter that is set; None when none is."""
        if not filters:
            return None
        where, params = filter_clause(filters)
        with self.engine.connect() as conn:
            return raw_ids(conn, f"SELECT id FROM images WHERE {where}", params)

    def series(self, filters: SearchFilters | None = None) -> tuple[list[tuple], np.ndarray]:
        """The CT/MR series ([(series UID, study UID, modality, slices, representative id)], their
        unit vectors), all or those with a slice matching the filters (indexer.store.series)."""
        from .series import series_candidates

        where, params = filter_clause(filters) if filters else (None, None)
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")  # one snapshot
            return series_candidates(conn, where, params)

    def values(self, column: str) -> dict[str, int]:
        """{value: images} of one column that a filter compares equal (for "no match" messages)."""
        from ..filters import EQUAL_COLUMNS

        if column not in EQUAL_COLUMNS:
            raise ValueError(column)
        with self.engine.connect() as conn:
            return dict(conn.execute(text(f"SELECT upper({column}), count(*) FROM images WHERE {column} IS NOT NULL "
                                          f"GROUP BY 1 ORDER BY 2 DESC")).all())

    def rows(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """{id: metadata} (path, frame, content_hash and METADATA_FIELDS) for the ids that exist."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        names = ("path", "frame", "content_hash") + METADATA_FIELDS
        found = fetch_raw(self.engine, f"SELECT id, {', '.join(names)} FROM images WHERE id IN "
                                       f"({','.join(map(str, ids))})")
        return {row[0]: {"path": py_path(row[1]), **dict(zip(names[1:], row[2:]))} for row in found}

    def vectors(self, ids: Sequence[int], conn: Connection | None = None) -> np.ndarray:
        """float32 (len(ids), D), in the order of `ids`; KeyError for an id SQLite does not hold."""
        ids = [int(i) for i in ids]
        if not ids:
            if conn is None:
                with self.engine.connect() as conn:
                    return self.vectors(ids, conn)
            return np.zeros((0, self._recorded_dim(conn, 0)), np.float32)
        self.vector_file.prefetch(ids)  # the disk fetches them while SQLite checks the ids
        query = f"SELECT id FROM images WHERE id IN ({','.join(map(str, set(ids)))})"
        found = {row[0] for row in (fetch_raw(self.engine, query) if conn is None else
                                    conn.connection.driver_connection.execute(query).fetchall())}
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"no images with ids {missing[:5]}")
        return self.vector_file.read(ids, prefetched=True)

    def all_vectors(self, conn: Connection) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every image, in the order of id, as `conn` sees them."""
        ids = raw_ids(conn, "SELECT id FROM images ORDER BY id")
        if not len(ids):
            return ids, np.zeros((0, self._recorded_dim(conn, 1)), np.float32)
        return ids, self.vector_file.read(ids)

    @staticmethod
    def _recorded_dim(conn: Connection, default: int) -> int:
        return int(read_meta(conn).get("model_dim") or default)

    def excluded(self) -> list[str]:
        """The folders `--remove` took out from under a folder still indexed (walks leave them out)."""
        with self.engine.connect() as conn:
            return [py_path(p) for p in conn.execute(text("SELECT path FROM excluded ORDER BY path")).scalars()]

    def roots(self) -> list[str]:
        """The folders and files mi-index was given, in order of path."""
        with self.engine.connect() as conn:
            return [py_path(p) for p in conn.execute(text("SELECT path FROM roots ORDER BY path")).scalars()]

    def status(self) -> dict[str, Any]:
        """What `mi-index --status` shows: counts, skipped files by reason, folders, model,
        size on disk and the last run."""
        with self.engine.connect() as conn:
            meta = read_meta(conn)
            images = int(conn.execute(text("SELECT count(*) FROM images")).scalar())
            files = int(conn.execute(text("SELECT count(*) FROM files WHERE error IS NULL")).scalar())
            skipped = dict(conn.execute(text("SELECT error, count(*) FROM files WHERE error IS NOT NULL "
                                             "GROUP BY error ORDER BY count(*) DESC")).all())
            modalities = dict(conn.execute(text("SELECT coalesce(modality, ''), count(*) FROM images "
                                                "GROUP BY 1 ORDER BY 2 DESC")).all())
        # st_blocks: the vector file has holes where removed rows were (they take no disk)
        size = sum(min(p.stat().st_size, p.stat().st_blocks * 512) for p in self.folder.iterdir() if p.is_file())
        return {"index": str(self.folder), "images": images, "files": files, "skipped": skipped,
                "modalities": modalities, "folders": self.roots(), "model": self.model_info,
                "size_bytes": size, "last_run_at": meta.get("last_run_at"),
                "last_run_seconds": float(meta["last_run_seconds"]) if meta.get("last_run_seconds") else None,
                "schema_version": int(meta.get("schema_version", 0))}

