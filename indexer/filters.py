"""The search filters: their fields and the columns they read, defined once, and the object a search carries.

`SearchFilters` is frozen, built once from the user's options and passed as it is from the command line through
`retrieval.Searcher` to the store's SQL (`IndexStore.filter_ids`, which reads FILTER_FIELDS)."""
from __future__ import annotations

import calendar
import datetime as dt
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import FilterError


@dataclass(frozen=True)
class FilterField:
    """One filter: its name (option, keyword and API parameter), the images column it reads, how it compares
    ("equal": case-insensitively; "from"/"to": an inclusive date bound; "under": a folder), its help, and for an
    "equal" filter the plural that a "no match" message names the column's values by."""

    name: str
    column: str
    compare: str
    help: str
    plural: str = ""


FILTER_FIELDS = (
    FilterField("modality", "modality", "equal", "Only this DICOM Modality (CR, DX, CT, ...).", "modalities"),
    FilterField("body_part", "body_part", "equal", "Only this BodyPartExamined (CHEST, ...).", "body parts"),
    FilterField("view", "view_position", "equal", "Only this ViewPosition (PA, AP, LL, ...).", "views"),
    FilterField("since", "study_date", "from", "Only studies on or after this date: YYYY-MM-DD, or YYYY-MM or "
                                               "YYYY for its first day."),
    FilterField("until", "study_date", "to", "Only studies on or before this date: YYYY-MM-DD, or YYYY-MM or "
                                             "YYYY for its last day."),
    FilterField("under", "path", "under", "Only files under this folder."),
)
FILTER_NAMES = tuple(field.name for field in FILTER_FIELDS)
EQUAL_COLUMNS = tuple(field.column for field in FILTER_FIELDS if field.compare == "equal")


@dataclass(frozen=True)
class SearchFilters:
    """Which images a search may return (the fields of FILTER_FIELDS). DICOM values (modality, body_part, view)
    are compared case-insensitively; study dates are inclusive; `under` is a resolved folder (or file)."""

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
        """Filters from user input: dates as YYYY-MM-DD, YYYY-MM or YYYY strings (a month or year: its first day
        for since, its last for until) or dates, `under` any path."""
        return cls(modality=modality or None, body_part=body_part or None, view=view or None,
                   since=_date(since, "since"), until=_date(until, "until"),
                   under=os.path.realpath(Path(under).expanduser()) if under else None)

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def set(self) -> list[tuple[FilterField, object]]:
        """(field, value) of each filter that is set, in FILTER_FIELDS' order."""
        return [(field, getattr(self, field.name)) for field in FILTER_FIELDS if getattr(self, field.name) is not None]

    def to_json(self) -> dict[str, str | None]:
        """{name: value}, dates as YYYY-MM-DD: as `make` reads them back (the API's fields)."""
        return {field.name: _text(getattr(self, field.name)) for field in FILTER_FIELDS}

    def describe(self) -> str:
        """`modality CR, since 2020-01-01`: for messages."""
        return ", ".join(f"{field.name.replace('_', ' ')} {value}" for field, value in self.set())


def _text(value: object) -> str | None:
    return value.isoformat() if isinstance(value, dt.date) else value  # type: ignore[return-value]


_YEAR_OR_MONTH = re.compile(r"(\d{4})(?:-(\d{2}))?")


def _date(value: str | dt.date | dt.datetime | None, name: str) -> dt.date | None:
    """A date bound from user input: YYYY-MM-DD, or a year (YYYY) or month (YYYY-MM), which since= reads as
    its first day and until= as its last: one rule for the command line, the server and the library."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    try:
        partial = _YEAR_OR_MONTH.fullmatch(text)
        if partial is None:
            return dt.date.fromisoformat(text)
        year, month = int(partial.group(1)), partial.group(2)
        last = next(field.compare for field in FILTER_FIELDS if field.name == name) == "to"
        if month is None:
            return dt.date(year, 12, 31) if last else dt.date(year, 1, 1)
        first = dt.date(year, int(month), 1)  # ValueError for month 00 or 13
        return first.replace(day=calendar.monthrange(year, first.month)[1]) if last else first
    except ValueError:
        raise FilterError(f"{name} must be a date as YYYY-MM-DD, YYYY-MM or YYYY, not {value!r}") from None
