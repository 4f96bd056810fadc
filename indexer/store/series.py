"""Series-level vectors for CT and MR (issue 20): a CT study is hundreds of single-frame files, so
each series also gets one vector, the L2-normalised mean of its slices' embeddings, kept in the
`series` table inside the transaction that adds or removes its slices. Its representative is
the slice nearest that mean. `mi-search --series` searches these rows (exact: there are a few
hundred times fewer series than slices)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection

SERIES_MODALITIES = ("CT", "MR")
ReadVectors = Callable[[Sequence[int]], np.ndarray]  # ids -> float32 (len(ids), D): the store's vectors
_IS_SLICE = "modality IN ('CT', 'MR') AND series_instance_uid IS NOT NULL"  # the partial index's WHERE


def series_vector(vectors: np.ndarray) -> np.ndarray:
    """The unit mean of unit vectors (N, D): the series' direction."""
    mean = np.asarray(vectors, np.float64).mean(axis=0)
    norm = np.linalg.norm(mean)
    return (mean / norm if norm > 0 else mean).astype(np.float32)


def series_of_rows(rows: Iterable[dict[str, Any]]) -> set[str]:
    """The series UIDs of CT/MR image rows about to be written."""
    return {row["series_instance_uid"] for row in rows
            if row.get("modality") in SERIES_MODALITIES and row.get("series_instance_uid")}


def series_where(conn: Connection, where: str, params: dict[str, Any] | tuple = ()) -> set[str]:
    """The series UIDs of the CT/MR images matching `where` (named parameters), before they go."""
    raw = conn.connection.driver_connection
    return {uid for (uid,) in raw.execute(f"SELECT DISTINCT series_instance_uid FROM images "
                                          f"WHERE {_IS_SLICE} AND ({where})", params)}


def series_at_paths(conn: Connection, paths: Sequence[Any]) -> set[str]:
    """The series UIDs of the CT/MR images of these files (paths as SQLite holds them)."""
    raw = conn.connection.driver_connection
    found: set[str] = set()
    for start in range(0, len(paths), 500):
        chunk = list(paths[start:start + 500])
        found.update(uid for (uid,) in raw.execute(
            f"SELECT DISTINCT series_instance_uid FROM images WHERE {_IS_SLICE} AND path IN "
            f"({', '.join('?' * len(chunk))})", chunk))
    return found


def refresh_series(conn: Connection, uids: Iterable[str], read_vectors: ReadVectors) -> None:
    """Recompute the series rows of `uids` from their slices as `conn` sees them (in its
    transaction; `read_vectors` gives the slices' vectors): a series with no slice left is deleted.
    Recomputed, not updated by sums: exact, and a series' slices are few compared with what
    encoding them cost."""
    raw = conn.connection.driver_connection
    for uid in uids:
        rows = raw.execute(f"SELECT id, study_instance_uid, modality FROM images "
                           f"WHERE series_instance_uid = ? AND {_IS_SLICE} ORDER BY id", (uid,)).fetchall()
        if not rows:
            raw.execute("DELETE FROM series WHERE series_instance_uid = ?", (uid,))
            continue
        vectors = read_vectors([row[0] for row in rows])
        mean = series_vector(vectors)
        best_id, study, modality = rows[int(np.argmax(vectors @ mean))]
        raw.execute("INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?)",
                    (uid, study, modality, len(rows), best_id, mean.tobytes()))


def refresh_all_series(conn: Connection, read_vectors: ReadVectors) -> None:
    """Every series row from the images (the migration that adds the table)."""
    raw = conn.connection.driver_connection
    uids = [uid for (uid,) in raw.execute(f"SELECT DISTINCT series_instance_uid FROM images WHERE {_IS_SLICE}")]
    refresh_series(conn, uids, read_vectors)


def series_candidates(conn: Connection, where: str | None = None, params: dict[str, Any] | None = None
                      ) -> tuple[list[tuple[str, str | None, str | None, int, int]], np.ndarray]:
    """([(series UID, study UID, modality, slices, representative id)], their vectors (N, D)) of
    every series, or of those with a slice matching `where` (a filter on images)."""
    raw = conn.connection.driver_connection
    query = "SELECT series_instance_uid, study_instance_uid, modality, slices, representative, embedding FROM series"
    if where:
        query += f" WHERE series_instance_uid IN (SELECT series_instance_uid FROM images WHERE {_IS_SLICE} AND {where})"
    rows = raw.execute(query, params or {}).fetchall()
    vectors = np.stack([np.frombuffer(row[5], np.float32) for row in rows]) if rows else np.zeros((0, 1), np.float32)
    return [tuple(row[:5]) for row in rows], vectors
