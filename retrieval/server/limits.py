"""The server's gate: a pure ASGI middleware in front of FastAPI that refuses a request from its headers (a
Host the server was not bound to, a missing token, a cross-origin POST, a declared body over its limit) and
counts the body's bytes as the application reads them (413 past the limit), so a hostile body is refused
before it is read, parsed, held in memory or spooled to disk."""
from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from indexer.errors import one_line

from .security import host_allowed, same_origin, token_given
from .uploads import MAX_UPLOAD_BYTES

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FORM_SLACK = 1 << 20  # the form fields and multipart framing beside an upload
# The largest body each route takes: an image upload (multipart), the query images as base64 JSON; else 1 MB.
BODY_LIMITS = {("POST", "/api/search"): MAX_UPLOAD_BYTES + FORM_SLACK,
               ("POST", "/api/query"): MAX_UPLOAD_BYTES * 4 // 3 + FORM_SLACK}
DEFAULT_BODY_LIMIT = 1 << 20
log = logging.getLogger(__name__)
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def body_limit(method: str, path: str) -> int:
    """The most bytes a request's body may hold."""
    return BODY_LIMITS.get((method, path.rstrip("/") or "/"), DEFAULT_BODY_LIMIT)


class RequestGate:
    """`app` behind the checks; `token` as the app's (required under /api when set); `hosts`: the names the
    server was bound to (the localhost forms are always accepted), None for no Host check (a test client)."""

    def __init__(self, app: ASGIApp, *, token: str | None, hosts: Iterable[str] | None) -> None:
        self.app, self.token = app, token
        self.hosts = None if hosts is None else tuple(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        method, path = scope["method"], scope["path"]
        port = (scope.get("server") or (None, None))[1]
        host = headers.get("host", "")
        if self.hosts is not None and not host_allowed(host, self.hosts, port):
            await _answer(send, 421 if host else 400, "this server does not answer for that Host name")
            return
        has_token = self.token is not None and token_given(headers, scope.get("query_string", b""), self.token)
        if path.startswith("/api") and self.token is not None and not has_token:
            await _answer(send, 401, "a token is required: Authorization: Bearer TOKEN")
            return
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and not has_token and not same_origin(origin, host):
            await _answer(send, 403, "a cross-origin request needs the token")
            return
        limit = body_limit(method, path)
        declared = headers.get("content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > limit):
            await _answer(send, 413 if declared.strip().isdigit() else 400, _too_large(limit))
            return
        await _counted(self.app, scope, receive, send, limit)


async def _counted(app: ASGIApp, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    """Run `app`, its body cut off at `limit` bytes: then 413 (if the app has not answered yet), the app
    told the client is gone, and whatever it sends after that dropped."""
    state = {"received": 0, "refused": False, "started": False}

    async def counting_receive() -> Message:
        if state["refused"]:
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request":
            state["received"] += len(message.get("body", b""))
            if state["received"] > limit:
                state["refused"] = True
                if not state["started"]:
                    state["started"] = True
                    await _answer(send, 413, _too_large(limit))
                return {"type": "http.disconnect"}
        return message

    async def guarded_send(message: Message) -> None:
        if state["refused"]:
            return
        if message["type"] == "http.response.start":
            state["started"] = True
        await send(message)

    try:
        await app(scope, counting_receive, guarded_send)
    except Exception as error:  # not one of the app's typed errors (its handlers answered those): a bug
        if state["refused"]:
            return
        log.error("%s %s failed: %s: %s", scope["method"], scope["path"], type(error).__name__, one_line(error))
        if not state["started"]:  # one line of JSON, never a traceback nor a server path
            await _answer(send, 500, f"internal error ({type(error).__name__}): see the server's log")


def _too_large(limit: int) -> str:
    return f"the request body is over {limit >> 20} MB"


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
