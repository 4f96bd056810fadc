"""Bounded HTTP reads for network sources: a GET whose decoded body is capped in bytes and whose
whole exchange (connecting, headers, body) ends by a deadline, and whose body is known to be
whole (Content-Length matched, or chunked framing closed).

Why not requests' `timeout`: it bounds each socket read, so a server sending one byte every
second never trips it. The deadline here is a timer that shuts the request's socket down, which
ends a blocked read at once; the connection is found through the pool's connection class
(`BoundedAdapter`, mounted on the session), which records itself for the thread sending it.

Why not `.content` or `.json()`: they read whatever the server sends, and a gzip answer of 547 KB
became 537 MB in memory. The body is read in chunks of decoded bytes (urllib3 2 inflates at most
the amount asked per read) and refused past `max_bytes`.
"""
from __future__ import annotations

import socket
import threading
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError as Urllib3Error

CHUNK = 4 << 20  # decoded bytes asked per read: large enough that a 2 MB instance is one read


class ResponseTooLarge(OSError):
    """The server sent more than the cap (decoded)."""


class DeadlineExceeded(OSError):
    """No whole answer within the request's deadline."""


class IncompleteBody(OSError):
    """The answer's body ended before its declared end (a closed connection, a cut chunk)."""


_local = threading.local()


class _Watch:
    """One request's deadline: when it passes, the socket of the connection sending the request
    is shut down (a blocked read returns at once) and the request counts as expired."""

    def __init__(self) -> None:
        self.expired = False
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shut()

    def attach(self, sock: socket.socket | None) -> None:
        """The request's socket (kept: a connection hands it to its response and forgets it)."""
        if sock is None:
            return
        with self._lock:
            self.sock = sock
            if self.expired:
                self._shut()

    def _shut(self) -> None:
        sock = self.sock
        if sock is not None:
            try:  # the plain socket's shutdown, under TLS too: SSLSocket's would drop its state mid-read
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


class _Watched:
    """A connection that tells this thread's watch (if any) the socket carrying the request: a
    reused one's when the request starts, a new one's once connected."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        watch = getattr(_local, "watch", None)
        if watch is not None:
            watch.attach(self.sock)  # type: ignore[attr-defined]

    def request(self, *args: Any, **kwargs: Any) -> Any:
        watch = getattr(_local, "watch", None)
        if watch is not None:
            watch.attach(self.sock)  # type: ignore[attr-defined]
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class BoundedAdapter(HTTPAdapter):
    """requests' adapter with connections `bounded_get` can cut at its deadline; mount it on
    http:// and https:// of a session (`bounded_session`)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(*args, **kwargs)
        manager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
        return manager


def bounded_session():
    """A requests session whose GETs `bounded_get` can bound."""
    import requests

    session = requests.Session()
    session.mount("http://", BoundedAdapter())
    session.mount("https://", BoundedAdapter())
    return session


def bounded_get(session: Any, url: str, *, max_bytes: int, deadline: float, timeout: Any,
                params: dict[str, Any] | None = None, headers: dict[str, str] | None = None
                ) -> tuple[Any, bytes]:
    """(response, its whole decoded body) of a GET through a `bounded_session`. Raises requests'
    errors as requests does (HTTPError for an error status, ConnectionError, Timeout), and
    ResponseTooLarge past `max_bytes`, DeadlineExceeded after `deadline` seconds in all,
    IncompleteBody for a body cut short."""
    watch = _Watch()
    _local.watch = watch
    timer = threading.Timer(deadline, watch.expire)
    timer.daemon = True
    timer.start()
    try:
        response = session.get(url, params=params, headers=headers, timeout=timeout, stream=True)
        with response:
            response.raise_for_status()
            body = _read_body(response, max_bytes)
        if watch.expired:  # the socket was shut: an end of a close-delimited body proves nothing
            raise DeadlineExceeded(f"no whole answer within {deadline:g} s")
        return response, body
    except Exception:
        if watch.expired:
            raise DeadlineExceeded(f"no whole answer within {deadline:g} s") from None
        raise
    finally:
        timer.cancel()
        _local.watch = None


def _read_body(response: Any, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length", "")
    identity = response.headers.get("Content-Encoding", "identity").strip().lower() in ("", "identity")
    if identity and declared.isdigit() and int(declared) > max_bytes:
        raise ResponseTooLarge(f"the answer is {int(declared):,} bytes, more than the {max_bytes:,} allowed")
    chunks: list[bytes] = []
    received = 0
    try:
        while True:
            chunk = response.raw.read(min(CHUNK, max_bytes + 1 - received), decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
            if received > max_bytes:
                raise ResponseTooLarge(f"the answer is more than the {max_bytes:,} bytes allowed (decoded)")
    except Urllib3Error as e:  # urllib3's own: a connection closed before the declared length, a cut chunk
        raise IncompleteBody(f"the answer was cut short ({type(e).__name__})") from None
    if declared.isdigit() and response.raw.tell() != int(declared):
        raise IncompleteBody(f"the answer was cut short ({response.raw.tell():,} of {int(declared):,} bytes)")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
