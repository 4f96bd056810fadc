"""An index's database opened with sqlite3 itself, for tests that look beneath the store: closed on
leaving. Python 3.11's sqlite3 connection sits in a reference cycle with its statement cache, so one
left unclosed keeps the file open until the garbage collector runs, and while it is open the store's
last close does not checkpoint the WAL into the file (a migration's VACUUM then looked undone)."""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from indexer.store.database import sqlite_uri


@contextmanager
def raw_db(index: Path, *, readonly: bool = False, timeout: float = 5.0) -> Iterator[sqlite3.Connection]:
    """`index`/index.sqlite (or the database file itself), committed when the block ends cleanly and
    closed either way."""
    path = Path(index)
    db = path if path.suffix == ".sqlite" else path / "index.sqlite"
    conn = sqlite3.connect(sqlite_uri(db, **({"mode": "ro"} if readonly else {})), uri=True, timeout=timeout)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def fetch_rows(index: Path, sql: str, params: tuple = (), **options) -> list[tuple]:
    """All the rows of one statement, the connection closed before they are returned."""
    with raw_db(index, **options) as conn:
        return conn.execute(sql, params).fetchall()
