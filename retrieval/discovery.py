"""How `mi-search` finds a running `mi-serve`: the small file the server writes into the index
folder, or MI_SERVER. Imports nothing heavy: a query answered by a warm server must not pay for
PyTorch, FAISS or SQLAlchemy.

    INDEX_DIR/server.json   {"url", "pid", "host", "token", "index"}, mode 0600, written when the
                            server listens and removed when it stops; a file whose process is gone
                            (a killed server) or that another machine wrote is ignored.
"""
from __future__ import annotations

import json
import os
import socket
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from indexer.errors import MIError

SERVER_FILE = "server.json"
SERVER_ENV = "MI_SERVER"              # http://HOST:PORT of a server to use, whatever its index
TOKEN_ENV = "MI_SERVER_TOKEN"         # its token, if it asks for one


@dataclass(frozen=True)
class ServerInfo:
    """Where a server listens and how to talk to it."""

    url: str                          # http://127.0.0.1:8765
    token: str | None = None
    pid: int | None = None
    host: str | None = None           # the machine that wrote the file (socket.gethostname())
    index: str | None = None          # the index folder it serves, resolved


class ServerRunningError(MIError):
    """Another server already serves the index (its process alive, its port answering)."""


def claim_server_file(index_dir: str | os.PathLike, info: ServerInfo) -> Path:
    """Announce `info` in the index folder, unless another live server on this machine announced itself
    there and still listens (ServerRunningError naming it); a stale file (a killed server's) is taken over.
    OSError when the folder cannot be written."""
    running = read_server_file(index_dir)
    # A file naming another index (a copied index folder) is not a server of this one.
    serves_this = running is not None and running.index in (None, info.index, str(index_dir))
    if running is not None and serves_this and running.pid != info.pid and _listening(running.url):
        raise ServerRunningError(f"mi-serve (pid {running.pid}) already serves {index_dir} on {running.url}/: "
                                 f"use it, or stop it first")
    return write_server_file(index_dir, info)


def write_server_file(index_dir: str | os.PathLike, info: ServerInfo) -> Path:
    """Write `info` atomically into the index folder, readable by its owner only (it holds the
    token). Raises OSError when the folder cannot be written."""
    target = Path(index_dir) / SERVER_FILE
    tmp = target.with_name(f".{SERVER_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(info), f)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def remove_server_file(index_dir: str | os.PathLike, pid: int) -> None:
    """Remove the server file if process `pid` wrote it (a newer server's file stays)."""
    target = Path(index_dir) / SERVER_FILE
    info = _read(target)
    if info is not None and info.pid == pid:
        target.unlink(missing_ok=True)


def read_server_file(index_dir: str | os.PathLike) -> ServerInfo | None:
    """The server file of a live server on this machine, else None (none, malformed, written
    by another machine, or its process is gone)."""
    info = _read(Path(index_dir) / SERVER_FILE)
    if info is None or info.host != socket.gethostname() or not _alive(info.pid):
        return None
    return info


def find_server(index_dir: str | os.PathLike) -> ServerInfo | None:
    """MI_SERVER (with MI_SERVER_TOKEN) if set, else the index folder's server file, else None."""
    url = os.environ.get(SERVER_ENV, "").strip()
    if url:
        return ServerInfo(url=url.rstrip("/"), token=os.environ.get(TOKEN_ENV) or None)
    return read_server_file(index_dir)


def _read(path: Path) -> ServerInfo | None:
    try:
        data = json.loads(path.read_text())
        return ServerInfo(url=str(data["url"]), token=data.get("token"), pid=int(data["pid"]),
                          host=data.get("host"), index=data.get("index"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _listening(url: str) -> bool:
    """Whether something accepts connections at `url` (a server listening but still loading counts)."""
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
