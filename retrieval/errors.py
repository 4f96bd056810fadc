"""Typed errors of the retrieval API. Each message says what went wrong and how to fix it;
`mi-search` prints it as one line."""
from __future__ import annotations

from indexer.errors import MIError


class SearchError(MIError):
    """Base class of the errors the retrieval API raises on purpose."""


class QueryError(SearchError, ValueError):
    """A query that cannot be run: bad syntax, an unreadable query image, an empty combination. `option`: the
    search option (retrieval.request.OPTIONS) the fix is about, for a front end to name its own spelling of it."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class EmptyIndexError(SearchError):
    """The index exists but holds no images yet."""


# One class for "another model than the index's", whichever of mi-index or mi-search meets it.
from indexer.errors import ModelMismatchError  # noqa: E402,F401
