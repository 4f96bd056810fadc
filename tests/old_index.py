"""Indexes as older versions of the program left them, made from a current one: for the tests of
the migrations that bring them up to date."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from indexer.store import IndexStore


def as_schema_7(index: Path) -> None:
    """Turn the index at `index` back into schema 7: the vectors float32 blobs in images.embedding
    (as float16 read them back) and no embeddings.f16."""
    with IndexStore.open(index, readonly=True) as store:
        with sqlite3.connect(index / "index.sqlite") as conn:
            ids = [row[0] for row in conn.execute("SELECT id FROM images ORDER BY id")]
        vectors = store.vectors(ids) if ids else []
        store.vector_file.reset()
    with sqlite3.connect(index / "index.sqlite") as conn:
        conn.execute("ALTER TABLE images ADD COLUMN embedding BLOB NOT NULL DEFAULT x''")
        conn.executemany("UPDATE images SET embedding = ? WHERE id = ?",
                         [(vector.tobytes(), row_id) for row_id, vector in zip(ids, vectors)])
        conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    with sqlite3.connect(index / "index.sqlite") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # on disk as the old program left it
