"""Bounds on what a PACS (DICOMweb or DIMSE) can make a run do: a cap on what a listing may hold,
listing records read without trusting their shape, retrieval failures told apart from bad
content, and no sweep on a listing that looks failed.

- Listing cap: a server that ignores `offset` (or makes up studies) would list forever; a run
  lists at most `max_listed` records (studies, series and instances together), then stops with
  one line saying how to raise the cap.
- Retrieval failures: an answer that was not received whole (cut, over its cap or deadline, an
  HTML page in place of DICOM) says nothing about the instance: `RetrievalFailed`, reported and
  tried again by the next run, never stored as the instance's fault.
- Sweeping: an empty listing while the index holds instances of the same query is taken for a
  failed listing (a 204, a broken proxy), not for an archive emptied: nothing is removed unless
  the user says the archive really is empty.
"""
from __future__ import annotations

import re
from typing import Any

from ..decode import TransientDecodeError
from ..errors import SourceError

MAX_LISTED = 1_000_000          # records a listing may hold (about 0.5 GB of memory at most)
MAX_LISTED_OPTION = "--max-listed"
EMPTY_LISTING_OPTION = "--allow-empty-listing"
UID = re.compile(r"[0-9A-Za-z._-]{1,64}")


class RetrievalFailed(TransientDecodeError):
    """An instance the source did not deliver whole this time: not judged (the content is not
    known), not recorded; the next run retrieves it again."""


class ListingBudget:
    """Counts the records a listing reads; SourceError past the cap."""

    def __init__(self, service: str, cap: int = MAX_LISTED) -> None:
        self.service, self.cap, self.count = service, max(1, int(cap)), 0

    def take(self, records: int) -> None:
        self.count += records
        if self.count > self.cap:
            raise SourceError(f"{self.service} listed more than {self.cap:,} records (studies, series, instances) "
                              f"and was still going: a server that ignores paging lists forever; if the archive "
                              f"really holds more, give {MAX_LISTED_OPTION} (nothing was changed)")


def record_uid(record: Any, tag: str) -> tuple[str | None, str | None]:
    """(UID, None) of a DICOM JSON record's `tag` (e.g. "0020000D"), or (None, why not) for a
    record of the wrong shape (not an object, the attribute not an object, Value not a list, the
    value not text)."""
    if not isinstance(record, dict):
        return None, f"a record that is {type(record).__name__}, not an object"
    attribute = record.get(tag)
    if attribute is None:
        return None, f"a record without {tag}"
    if not isinstance(attribute, dict):
        return None, f"{tag} is {type(attribute).__name__}, not an attribute object"
    values = attribute.get("Value")
    if not isinstance(values, list) or not values:
        return None, f"{tag} has no Value list"
    return checked_uid(values[0], tag)


def checked_uid(value: Any, what: str) -> tuple[str | None, str | None]:
    """(UID, None), or (None, why not) for a value that is not one: a UID goes into keys and URL
    paths, so it holds no '/', '?', '%' or spaces (DICOM's are digits and dots; letters, '-' and '_'
    are tolerated from archives that use them)."""
    text = value.strip() if isinstance(value, str) else None
    if not text or not UID.fullmatch(text):
        return None, f"{what} is not a UID ({type(value).__name__}{': ' + repr(value)[:40] if text else ''})"
    return text, None


def check_sweep(source: Any, listed: int, removed: int) -> None:
    """Called before known items that were not listed are removed: SourceError when the listing is
    empty but `removed` of the index's items would go, unless the source allows that
    (`allow_empty_listing`)."""
    allowed = getattr(source, "allow_empty_listing", None)  # None: not a PACS (a folder's listing is its disk's)
    if listed or not removed or allowed is None or allowed:
        return
    raise SourceError(f"{source.name} listed nothing, while the index holds {removed} of its instances under this "
                      f"query: a failed listing is not taken for an emptied archive, nothing was removed; if the "
                      f"archive really is empty, run again with {EMPTY_LISTING_OPTION}")
