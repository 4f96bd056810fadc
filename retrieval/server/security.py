"""Who may ask the server: the token every API call carries when one is set, the Host names it answers for
(no DNS rebinding), same-origin requests, and what counts as loopback."""
from __future__ import annotations

import hmac
import ipaddress
import urllib.parse
from collections.abc import Iterable, Mapping

from fastapi import HTTPException, Request

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")  # a loopback server's own names, whatever it was bound to
WILDCARDS = ("", "0.0.0.0", "::")                 # bound to every address: any name reaches it (a token is required)


async def authorised(request: Request) -> None:
    """A dependency of every API route: the app's token (app.state.token), as `Authorization: Bearer TOKEN` or
    `?token=` (the page's images), else 401. (limits.RequestGate checks it first, before any body is read.)
    async: it does no I/O, and a plain def cost every request a hop through the thread pool."""
    token = request.app.state.token
    if token is not None and not token_given(request.headers, request.scope.get("query_string", b""), token):
        raise HTTPException(401, "a token is required: Authorization: Bearer TOKEN")


def token_given(headers: Mapping[str, str], query_string: bytes, token: str) -> bool:
    """Whether a request carries `token`: `Authorization: Bearer TOKEN`, or `?token=TOKEN`."""
    given = headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not given:
        query = urllib.parse.parse_qs(query_string.decode("latin-1"))
        given = (query.get("token") or [""])[0]
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode())


def host_allowed(host_header: str, bound: Iterable[str], port: int | None) -> bool:
    """Whether a Host header names this server: a name it was bound to or a localhost form, with its port
    (or none). A page whose DNS name was rebound to 127.0.0.1 sends its own name, and is refused."""
    name, given_port = _split_host(host_header)
    if name is None or (given_port is not None and port is not None and given_port != port):
        return False
    names = {_normal(host) for host in bound}
    return bool(names & set(WILDCARDS)) or name in names | set(LOCAL_NAMES)


def same_origin(origin: str, host_header: str) -> bool:
    """Whether an Origin header is this server's own page (the Host it was asked as)."""
    parts = urllib.parse.urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(host_header) and parts.netloc.lower() == host_header.lower()


def _split_host(value: str) -> tuple[str | None, int | None]:
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else ("" if not rest else None)
    else:
        name, _, port = value.partition(":") if value.count(":") <= 1 else (value, "", "")
    if not name or port is None or (port and not port.isdigit()):
        return None, None
    return name, int(port) if port else None


def _normal(host: str) -> str:
    return host.strip().lower().removeprefix("[").removesuffix("]")


def is_loopback(host: str) -> bool:
    """Whether a listening address reaches this machine only (anything else needs a token)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
