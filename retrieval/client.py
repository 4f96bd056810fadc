"""`mi-search` through a running `mi-serve`: the standard library's urllib only, so a query that
a warm server answers imports neither PyTorch nor FAISS nor SQLAlchemy.

The query is parsed here (a term naming a file on this machine is an image), image files are
read here and sent as bytes (the server never opens a path it is sent), and the hits come back
with full-precision scores as the `Hit` records a local search makes: `mi-search` prints both
the same way.
"""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .discovery import ServerInfo
from .errors import QueryError, SearchError
from .hits import Hit
from .query import QueryTerm
from .request import SearchRequest

TIMEOUT_S = 600.0  # a cold server loads a tower on its first query: seconds to a minute
INDEX_HEADER = "X-MI-Index"  # the index the client means; a server of another one answers 421
_HIT_FIELDS = {"rank", "score", "id", "copies", "in_group", "missing", "labels", "viewer_url"}


class ServerUnavailable(Exception):
    """No usable server answered (refused, gone, serving another index): search locally."""


class ServerError(SearchError):
    """The server refused the search; the message is its one-line reason."""


class Client:
    """Requests to one server. `index`: the index folder the caller means, sent so that a server
    of another index declines (None: whatever index the server has)."""

    def __init__(self, info: ServerInfo, index: str | None = None, timeout: float = TIMEOUT_S) -> None:
        self.info, self.index, self.timeout = info, index, timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request with a JSON body; the JSON answer. ServerUnavailable when nothing usable
        answers, ServerError with the server's reason when it refuses."""
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if self.info.token:
            headers["Authorization"] = f"Bearer {self.info.token}"
        if self.index:
            headers[INDEX_HEADER] = urllib.parse.quote(os.fsencode(self.index))
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.info.url + path, data=data, method=method, headers=headers)
        try:
            with _opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 421:
                raise ServerUnavailable(_reason(error)) from None
            raise ServerError(_reason(error)) from None
        except (urllib.error.URLError, OSError, ValueError) as error:  # refused, reset, timed out, not JSON
            raise ServerUnavailable(f"no answer from {self.info.url}: {error}") from None

    def search(self, request: SearchRequest) -> list[Hit]:
        """The server's hits for a search request (retrieval.request), its image terms sent as their bytes."""
        answer = self.call("POST", "/api/query", {"terms": [_term(term) for term in request.terms],
                                                  **request.to_json()})
        return [hit_from_row(row) for row in answer["hits"]]


def hit_from_row(row: dict[str, Any]) -> Hit:
    """A hit as the API sends it -> the `Hit` a local search makes."""
    metadata = {key: value for key, value in row.items() if key not in _HIT_FIELDS}
    return Hit(rank=row["rank"], score=row["score"], id=row["id"], path=row["path"], metadata=metadata,
               labels=row.get("labels"), copies=row.get("copies", 1), in_group=row.get("in_group", 1),
               missing=bool(row.get("missing")), viewer_url=row.get("viewer_url"))


def _term(term: QueryTerm) -> dict[str, Any]:
    if term.kind == "text":
        return {"kind": "text", "text": term.value, "weight": term.weight}
    try:
        with open(term.value, "rb") as f:
            data = f.read()
    except OSError as error:
        raise QueryError(f"cannot read the query image {term.value}: {error.strerror or error}") from None
    return {"kind": "image", "data": base64.b64encode(data).decode("ascii"),
            "name": os.path.basename(term.value), "weight": term.weight}


def _reason(error: urllib.error.HTTPError) -> str:
    try:
        reason = json.loads(error.read()).get("error")
    except (ValueError, AttributeError, OSError):
        reason = None
    return str(reason) if reason else f"the server answered {error.code} {error.reason}"


# No proxies: the server is on this machine (or named by MI_SERVER), never behind HTTP_PROXY.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
