"""Indexes as older versions of the program left them, made from a current one: for the tests of
the migrations that bring them up to date."""
from __future__ import annotations

from pathlib import Path

from indexer.store import IndexStore

from raw_sqlite import fetch_rows, raw_db


def as_schema_7(index: Path) -> None:
    """Turn the index at `index` back into schema 7: the vectors float32 blobs in images.embedding
    (as float16 read them back) and no embeddings.f16."""
    with IndexStore.open(index, readonly=True) as store:
        ids = [row[0] for row in fetch_rows(index, "SELECT id FROM images ORDER BY id")]
        vectors = store.vectors(ids) if ids else []
        store.vector_file.reset()
    with raw_db(index) as conn:
        conn.execute("ALTER TABLE images ADD COLUMN embedding BLOB NOT NULL DEFAULT x''")
        conn.executemany("UPDATE images SET embedding = ? WHERE id = ?",
                         [(vector.tobytes(), row_id) for row_id, vector in zip(ids, vectors)])
        conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    fetch_rows(index, "PRAGMA wal_checkpoint(TRUNCATE)")  # on disk as the old program left it
