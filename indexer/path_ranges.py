"""Paths in the order the index keeps them, by their bytes: the bytes every path under a folder starts
with, and the first bytes after all of them. One rule for the store's range queries and for the walks
that split folders between processes, in a module that imports nothing heavy."""
from __future__ import annotations

import os


def path_prefix(folder: str | os.PathLike) -> bytes:
    """`folder/` as bytes: the bytes every path under it starts with, text or BLOB alike."""
    return os.fsencode(os.fspath(folder).rstrip(os.sep) + os.sep)


def prefix_end(prefix: bytes) -> bytes:
    """The first bytes after every path that starts with `prefix` (which ends in the separator '/',
    0x2f: never 0xff), so that `prefix <= path < prefix_end(prefix)` is "under"."""
    return prefix[:-1] + bytes([prefix[-1] + 1])
