"""Owner-only files: an index folder (and its thumbnails folder) is created 0700, the files in it
0600, SQLite's -wal and -shm included, so that other users of the machine read none of it; and
the folder fsync that makes a file created or renamed there durable."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

FOLDER_MODE = 0o700
FILE_MODE = 0o600


@contextmanager
def owner_only():
    """Files created inside (by SQLite, FAISS, anything) get no group or other permission. The
    umask is the process's: it only narrows what other threads create meanwhile."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def private_folder(path: Path) -> None:
    """`path` made if missing, 0700 (parents too, as mkdir makes them); an existing folder is left
    as its owner set it."""
    if path.is_dir():
        return
    with owner_only():
        path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)


def make_private(*paths: Path) -> None:
    """Existing files chmod 0600 (an index written before this rule); missing or foreign ones skipped."""
    for path in paths:
        try:
            if path.exists() and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
                os.chmod(path, FILE_MODE)
        except OSError:
            pass


def write_private(path: Path, data: bytes) -> None:
    """`data` written to a new or truncated file of mode 0600."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)


def fsync_folder(folder: Path) -> None:
    """Make a file created or renamed in `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
