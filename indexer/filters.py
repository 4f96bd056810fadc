"""The search filters: one frozen object, built once from the user's options and passed as it is
from the command line through `retrieval.Searcher` to the store's SQL."""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import FilterError


@dataclass(frozen=True)
class SearchFilters:
    """Which images a search may return. DICOM values (modality, body_part, view) are compared
    case-insensitively; study dates are inclusive; `under` is a resolved folder (or file)."""

    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None
    under: str | None = None

    @classmethod
    def make(cls, *, modality: str | None = None, body_part: str | None = None, view: str | None = None,
             since: str | dt.date | dt.datetime | None = None, until: str | dt.date | dt.datetime | None = None,
             under: str | os.PathLike | None = None) -> SearchFilters:
        """Filters from user input: dates as YYYY-MM-DD strings or dates, `under` any path."""
        return cls(modality=modality or None, body_part=body_part or None, view=view or None,
                   since=_date(since, "since"), until=_date(until, "until"),
                   under=os.path.realpath(Path(under).expanduser()) if under else None)

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def describe(self) -> str:
        """`modality CR, since 2020-01-01`: for messages."""
        return ", ".join(f"{f.name.replace('_', ' ')} {getattr(self, f.name)}" for f in fields(self)
                         if getattr(self, f.name) is not None)


def _date(value: str | dt.date | dt.datetime | None, name: str) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise FilterError(f"{name} must be a date as YYYY-MM-DD, not {value!r}") from None
