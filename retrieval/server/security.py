"""Who may ask the server: the token every API call carries when one is set, and what counts as loopback."""
from __future__ import annotations

import hmac
import ipaddress

from fastapi import HTTPException, Request


def authorised(request: Request) -> None:
    """A dependency of every API route: the app's token (app.state.token), as `Authorization: Bearer TOKEN` or
    `?token=` (the page's images), else 401."""
    token = request.app.state.token
    if token is None:
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
        or request.query_params.get("token", "")
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "a token is required: Authorization: Bearer TOKEN")


def is_loopback(host: str) -> bool:
    """Whether a listening address reaches this machine only (anything else needs a token)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
