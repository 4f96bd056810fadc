"""Opening the index database: the SQLAlchemy engine (its pragmas, its errors turned into typed
one-line StoreErrors), the schema migrations run on open, and the one writer's lock file."""
from __future__ import annotations

import errno
import os
import sqlite3
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.pool import QueuePool

from ..errors import (IndexBusyError, IndexDamagedError, IndexFormatError, IndexNotFoundError, IndexReadOnlyError,
                      StorageFullError, StoreError, one_line)
from ..private_files import make_private, owner_only, private_folder
from .schema import MIGRATIONS, SCHEMA_VERSION
from .sql import set_meta

DB_NAME = "index.sqlite"
LOCK_NAME = "index.lock"


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


def sqlite_uri(db: Path, **params: str) -> str:
    """An SQLite URI for the file `db` with its characters quoted: a path holding `#`, `?` or
    `%` must name that file, not cut the URI short or pass part of the path as a parameter."""
    uri = Path(db).absolute().as_uri()
    return uri + ("?" + "&".join(f"{key}={value}" for key, value in params.items()) if params else "")


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


WRITER_CACHE_KIB = 256 * 1024  # the writer's SQLite page cache (readers keep SQLite's default 2 MB)


def give_writer_cache(engine: Engine) -> None:
    """Connections of the one writer get a page cache of WRITER_CACHE_KIB, filled only as used: a
    transaction that touches more pages than the cache holds spills them to the WAL and reads them
    back. --remove of 10% (100k interleaved rows) at 1M: 10.4 s with the default, 6.1 s with 256 MB
    (1 GB: no faster; the process stayed at 0.25 GB)."""
    event.listen(engine, "connect", lambda connection, _record:
                 connection.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}"))
    engine.dispose()  # connections pooled before were opened without it


_FOLDERS: weakref.WeakKeyDictionary[Engine, Path] = weakref.WeakKeyDictionary()  # open_engine's, for raw errors


@contextmanager
def raw_errors(engine: Engine) -> Iterator[None]:
    """sqlite3's own errors inside the block (statements run on the sqlite3 connection beneath SQLAlchemy,
    which never sees them) as the store's one-line errors naming the index, as SQLAlchemy's are."""
    try:
        yield
    except sqlite3.Error as error:
        raise storage_error(error, _FOLDERS.get(engine, Path("."))) from None


def fetch_raw(engine: Engine, query: str, params: dict | tuple = ()) -> list[tuple]:
    """The rows of one small read (`query` with sqlite3's `?` or `:name` params) through a pooled sqlite3
    connection, without SQLAlchemy's result machinery: a search makes several (its generation, its
    hits' rows and vectors), and each cost 0.12-0.3 ms through SQLAlchemy, 0.04 ms this way."""
    connection = engine.raw_connection()
    try:
        with raw_errors(engine):
            return connection.driver_connection.execute(query, params).fetchall()
    finally:
        connection.close()


def execute_many_raw(conn: Connection, statement: str, rows: list[dict]) -> None:
    """`statement` (sqlite3's `:name` params) once per row, through the sqlite3 connection beneath `conn`,
    in its transaction: SQLAlchemy made each row's parameters at ~25 us a row (0.75 s of adding 10k
    images: three statements of 10k rows each)."""
    with raw_errors(conn.engine):
        conn.connection.driver_connection.executemany(statement, rows)


def open_engine(folder: Path, *, create: bool, readonly: bool) -> Engine:
    """The engine of the database in `folder`, migrated to this program's schema (made first
    when `create`); typed StoreErrors for a missing, newer, damaged or unwritable index."""
    db = folder / DB_NAME
    if not db.exists():
        if not create:
            raise IndexNotFoundError(f"no index at {folder}: build one with `mi-index FOLDER --index {folder}`")
        try:
            private_folder(folder)
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
    _FOLDERS[engine] = folder
    try:
        with owner_only(), engine.begin() as conn:  # index.sqlite, -wal and -shm made 0600
            if not readonly:
                conn.exec_driver_sql("PRAGMA journal_mode = WAL")
                # DDL runs in autocommit under Python's sqlite3 unless a transaction is opened
                # explicitly: a migration killed halfway must leave nothing behind.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            migrate(conn, folder, readonly)
    except StoreError:
        engine.dispose()
        raise
    except (DatabaseError, OperationalError) as e:
        engine.dispose()
        raise storage_error(e, folder) from None
    if not readonly:
        make_private(db, db.with_name(DB_NAME + "-wal"), db.with_name(DB_NAME + "-shm"))
        _vacuum_after_migration(engine, folder)
    return engine


def _vacuum_after_migration(engine: Engine, folder: Path) -> None:
    """Give back the pages a migration freed (the vectors' column: most of the file). VACUUM runs
    outside any transaction and is atomic; a kill leaves the flag, and the next open does it."""
    with engine.connect() as conn:
        if not conn.execute(text("SELECT 1 FROM meta WHERE key = 'vacuum_after_migration'")).first():
            return
    try:
        with owner_only(), engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.execute("VACUUM")
            # VACUUM in WAL mode writes the whole new file into the WAL: fold it in and truncate
            # it now, not at the last connection's close, which another open one would put off.
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM meta WHERE key = 'vacuum_after_migration'"))
    except (DatabaseError, OperationalError, sqlite3.Error) as e:
        raise storage_error(e, folder) from None


def migrate(conn: Connection, folder: Path, readonly: bool) -> None:
    """Bring the database up to SCHEMA_VERSION (in the caller's transaction), or refuse it."""
    has_meta = conn.execute(text("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'")).first()
    version = int(conn.execute(text("SELECT value FROM meta WHERE key='schema_version'")).scalar() or 0) \
        if has_meta else 0
    if version > SCHEMA_VERSION:
        raise IndexFormatError(f"the index at {folder} has schema version {version}, newer than this "
                               f"program's {SCHEMA_VERSION}: upgrade medimageinsight-search")
    if version < SCHEMA_VERSION:
        if readonly:
            raise IndexFormatError(f"the index at {folder} needs an upgrade: run mi-index on it first")
        conn.info["index_folder"] = folder  # for a migration that writes beside the database
        for migration in MIGRATIONS[version:]:
            migration(conn)
        set_meta(conn, {"schema_version": str(SCHEMA_VERSION)})


# ---------------------------------------------------------------- the writer's lock

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


_held_locks: list = []  # lock files of this process: closed in forked children


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


def take_writer_lock(folder: Path) -> IO:
    """The open lock file of the one writer of `folder`; IndexBusyError while another holds it."""
    try:
        with owner_only():
            file = open(folder / LOCK_NAME, "w")
    except OSError as e:
        raise storage_error(e, folder) from None
    try:
        _lock_exclusively(file)
    except OSError:
        file.close()
        raise IndexBusyError(f"another mi-index is writing to {folder}; wait for it to finish") from None
    _held_locks.append(file)
    return file


def release_writer_lock(file: IO) -> None:
    if file in _held_locks:
        _held_locks.remove(file)
    file.close()
