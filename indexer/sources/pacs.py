"""What both kinds of PACS source share (DICOMweb and DIMSE): the server-side filters, the
version token of an instance, which of the index's records a run covers, and the Source methods
that follow from an archive's instances being immutable."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import SourceError
from .base import BoundedRetrievals, Item

if TYPE_CHECKING:
    from ..store import IndexStore


@dataclass(frozen=True)
class QueryFilters:
    """What to index of the archive, as QIDO-RS matching keys applied by the server."""

    modalities: tuple[str, ...] = ()      # CR, DX: ModalitiesInStudy for studies, Modality for series
    study_date: str | None = None         # 20200101-20201231, 20200101-, or one date
    body_part: str | None = None          # BodyPartExamined of the series

    def __post_init__(self) -> None:
        if self.study_date and not re.fullmatch(r"\d{8}|\d{8}-|-\d{8}|\d{8}-\d{8}", self.study_date):
            raise SourceError(f"--study-date {self.study_date}: write YYYYMMDD, a range YYYYMMDD-YYYYMMDD, "
                              f"or an open one (YYYYMMDD- or -YYYYMMDD)")

    def __bool__(self) -> bool:
        return bool(self.modalities or self.study_date or self.body_part)

    def covers(self, modality: str | None, body_part: str | None, study_date: str | None) -> bool:
        """Whether an indexed instance with these stored fields (study_date ISO) is one the server
        would list under these filters."""
        if self.modalities and (modality or "").upper() not in {m.upper() for m in self.modalities}:
            return False
        if self.body_part and (body_part or "").upper() != self.body_part.upper():
            return False
        if self.study_date:
            if not study_date:
                return False
            low, _, high = self.study_date.partition("-") if "-" in self.study_date else \
                (self.study_date, "", self.study_date)
            day = study_date.replace("-", "")
            return (not low or day >= low) and (not high or day <= high)
        return True

    def study_params(self) -> dict[str, str]:
        params = {"StudyDate": self.study_date} if self.study_date else {}
        if self.modalities:
            params["ModalitiesInStudy"] = ",".join(self.modalities)
        return params

    def series_params(self) -> dict[str, str]:
        params = {"Modality": ",".join(self.modalities)} if self.modalities else {}
        if self.body_part:
            params["BodyPartExamined"] = self.body_part
        return params


def known_under(store: IndexStore, service: str, filters: QueryFilters, listed: Sequence[str]) -> dict[str, tuple]:
    """The index's records of a PACS's instances that a run under `filters` covers: all of them
    unfiltered; filtered, those listed and those whose stored fields match the filters (gone
    from the archive: swept), the others staying indexed as they are."""
    known = store.files_under([service])  # a key prefix, not a folder: str, as Path would fold the '//'
    if not filters:
        return known
    listed_now = set(listed)
    others = [key for key in known if key not in listed_now]
    fields = store.first_image_fields(others, ("modality", "body_part", "study_date"))
    return {key: record for key, record in known.items()
            if key in listed_now or (key in fields and filters.covers(**fields[key]))}


def version_token(key: str) -> int:
    """A stable stand-in for a file's mtime: an instance does not change under its UID."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 2


class PacsSource(BoundedRetrievals):
    """The Source methods of an archive reached at `url`, listing under `filters` and reading
    with `read_many` (each item's bytes, or the error reading it)."""

    url: str
    filters: QueryFilters
    kind = "dicom"  # what an archive serves is DICOM, with or without a preamble

    @property
    def name(self) -> str:
        return self.url

    def known(self, store: IndexStore, listed: Sequence[str]) -> dict[str, tuple]:
        return known_under(store, self.url, self.filters, listed)

    def accepts(self, item: Item) -> bool:
        return True  # an instance without pixels (a report) is skipped with its reason

    def sweepable(self, key: str) -> bool:
        return True  # listing failures stop the run before anything is swept

    def read(self, item: Item) -> bytes:
        data = self.read_many([item])[0]
        if isinstance(data, BaseException):
            raise data
        return data

    def read_many(self, items: Sequence[Item]) -> list[bytes | BaseException]:
        raise NotImplementedError
