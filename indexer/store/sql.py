"""The SQL shapes the store repeats, written once: paths as SQLite holds them, "this path or
under it", `meta` upserts, and IN-queries over many paths in chunks."""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..path_ranges import path_prefix, prefix_end

IN_CHUNK = 500  # paths per IN (...) list: far below SQLite's limit of bound parameters


def db_path(path: str | os.PathLike) -> str | bytes:
    """A path as SQLite stores it: text, or for a name that is not valid UTF-8 (legal on Linux,
    common on old shares; Python holds its bytes as surrogate escapes) the raw bytes as a BLOB,
    so that every name round-trips exactly."""
    path = os.fspath(path)
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def py_path(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def at_or_under(root: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """A WHERE clause and its parameters: `path` is `root` (a file, a folder, a PACS service) or
    lies under it. "Under" is a range, `path_prefix <= path < prefix_end` (`between`), and `data2/`
    is not under `data/` because the prefix ends in the separator."""
    prefix = path_prefix(root)
    clause, params = between(prefix, prefix_end(prefix))
    return f"(path = :root OR {clause})", {"root": db_path(root), **params}


def between(low: bytes, high: bytes) -> tuple[str, dict[str, Any]]:
    """A WHERE clause and its parameters: the bytes of `path` lie in [low, high). The index on path
    answers it (a substr() of every path scanned the whole index): SQLite compares text by its UTF-8
    bytes and BLOBs by their bytes, and sorts every TEXT before every BLOB, so one range over text
    and one over BLOBs (names that are not UTF-8) find exactly the paths in the range; '%' and '_'
    mean nothing in a comparison."""
    params: dict[str, Any] = {"blob_low": low, "blob_high": high}
    clause = "(path >= :blob_low AND path < :blob_high)"
    try:
        params.update(text_low=low.decode("utf-8"), text_high=high.decode("utf-8"))
        clause += " OR (path >= :text_low AND path < :text_high)"
    except UnicodeDecodeError:  # a folder whose name is not UTF-8: everything under it is a BLOB
        pass
    return clause, params


def set_meta(conn: Connection, values: Mapping[str, str]) -> None:
    """Upsert keys of the `meta` table."""
    conn.execute(text("INSERT OR REPLACE INTO meta VALUES (:key, :value)"),
                 [{"key": key, "value": value} for key, value in values.items()])


def rows_at_paths(conn: Connection, query: str, paths: Sequence[str]) -> Iterator[Any]:
    """The rows of `query` (which ends in `path IN`) for `paths`, asked in chunks of IN_CHUNK."""
    for start in range(0, len(paths), IN_CHUNK):
        chunk = list(paths[start:start + IN_CHUNK])
        yield from conn.execute(text(f"{query} ({', '.join(f':p{i}' for i in range(len(chunk)))})"),
                                {f"p{i}": db_path(path) for i, path in enumerate(chunk)})
