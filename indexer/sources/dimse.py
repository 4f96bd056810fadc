"""An older PACS as a source, over DIMSE: list with C-FIND, retrieve with C-GET (pynetdicom).

`mi-index dimse://ARCHIVE_AET@host:104 --calling-aet MI-INDEX --modality CR,DX` indexes what the
archive lists under the filters (the same QIDO-like keys as DICOMweb, in C-FIND identifiers),
decoded by the file decoder. What the archive must allow: C-FIND and C-GET from the calling AE
title (`--calling-aet`, default MI-INDEX; Orthanc: a `DicomModalities` entry for it, or
`DicomAlwaysAllowFind`/`DicomAlwaysAllowGet`). C-GET sends the instances back over the same
association, so the archive needs no route to this machine (no C-MOVE destination, no port).

- Key: `dimse://ARCHIVE_AET@host:port/studies/S/series/SE/instances/I` (`indexer.pacs_keys`);
  version token, incremental runs, sweeping and filters as for DICOMweb (`indexer.sources.pacs`).
- Bytes: the instance as received over C-GET, as a Part 10 file. Every transfer syntax is
  offered, so an archive can send what it stores without transcoding.
- Failures: an association that cannot be opened is tried again with backoff; when it still
  fails, or the archive rejects the association (an AE title it does not know), the run stops
  with a `SourceError` (what was committed stays). An instance the archive no longer has is
  one skipped item. At most `connections` associations retrieve at once.
- Bounds (`indexer.sources.guards`): a listing holds at most `max_listed` records (an archive can
  send C-FIND results forever); each C-FIND and each C-GET ends by a deadline (`FIND_DEADLINE`,
  `GET_DEADLINE`), not only per message, the association aborted past it; an instance that did
  not arrive whole is not retrieved (tried again next run), and instances sent without being
  asked for are dropped; a UID that is not one is skipped with its reason.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import SourceError
from ..extras import require
from ..pacs_keys import DIMSE_SCHEME, instance_key, instance_uids, service_url
from .base import Item
from .guards import MAX_LISTED, ListingBudget, RetrievalFailed, checked_uid
from .pacs import PacsSource, QueryFilters, version_token

log = logging.getLogger(__name__)

DEFAULT_CALLING_AET = "MI-INDEX"
AET_ENV = "MI_DIMSE_AET"
TIMEOUT = 60.0                              # seconds: association, DIMSE message, network
FIND_DEADLINE = 600.0                       # seconds for all the results of one C-FIND
GET_DEADLINE = 600.0                        # seconds for one instance's C-GET
MAX_INSTANCE_BYTES = 2 << 30                # an instance as received: 2 GiB
# C-GET needs a presentation context for each SOP class and transfer syntax an instance may come
# in (one context carries one accepted transfer syntax): an archive sends what it stores only
# where a context has its syntax, and cannot always transcode (Orthanc has no JPEG 2000 encoder).
# 128 contexts at most: the SOP classes of the group being retrieved (known from the listing),
# each with every syntax below; FALLBACK_CLASSES when the class is not known.
TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
                     "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                     "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
                     "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5")
FALLBACK_CLASSES = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",
                    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.6.1",
                    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.1.2")  # CR, DX, DX, CT, MR, US, SC, MG
MAX_CLASSES = 126 // len(TRANSFER_SYNTAXES)
SUCCESS, PENDING = 0x0000, (0xFF00, 0xFF01)


def parse_url(text: str) -> tuple[str, str, int]:
    """(archive AE title, host, port) of dimse://AET@host:port; SourceError when malformed."""
    match = re.fullmatch(r"dimse://([^@/]{1,16})@([^:/@]+|\[[0-9a-fA-F:]+\]):(\d{1,5})/?", text)
    if not match:
        raise SourceError(f"not a DIMSE address: {text} (write dimse://ARCHIVE_AET@HOST:PORT, e.g. "
                          f"dimse://ORTHANC@127.0.0.1:4242)")
    return match.group(1), match.group(2).strip("[]"), int(match.group(3))


@dataclass
class DimseSource(PacsSource):
    """The instances a DIMSE archive lists (C-FIND, under `filters`), read with C-GET. Pickles
    without its associations (each process opens its own)."""

    url: str                                # dimse://ARCHIVE_AET@host:port
    filters: QueryFilters = QueryFilters()
    calling_aet: str = DEFAULT_CALLING_AET
    connections: int = 4
    attempts: int = 4                       # tries to open an association before the run stops
    backoff: float = 0.5
    refused: list[tuple[str, str]] = field(default_factory=list)
    max_listed: int = MAX_LISTED            # records (studies, series, instances) a listing may hold
    allow_empty_listing: bool = False       # an empty listing may sweep what the index holds of it
    find_deadline: float = FIND_DEADLINE
    get_deadline: float = GET_DEADLINE
    max_instance_bytes: int = MAX_INSTANCE_BYTES
    _classes: dict[str, str] = field(default_factory=dict, repr=False)  # SOP instance UID -> SOP class UID

    def __post_init__(self) -> None:
        require("pacs", "pynetdicom", "indexing a PACS over DIMSE")
        self.called_aet, self.host, self.port = parse_url(self.url)
        self.url = f"{DIMSE_SCHEME}{self.called_aet}@{self.host}:{self.port}"
        if not 0 < len(self.calling_aet) <= 16:
            raise SourceError(f"--calling-aet {self.calling_aet!r}: an AE title has 1 to 16 characters")
        self._bound_retrievals()

    # ---------------------------------------------------------------- associations
    def _associate(self, received: dict[str, Any] | None = None, classes: Sequence[str] = (),
                   wanted: frozenset[str] = frozenset()):
        """An open association (for C-GET of instances of `classes` when `received` collects the
        instances sent back: those of `wanted`, the others dropped)."""
        from pynetdicom import AE, build_role, evt
        from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                          StudyRootQueryRetrieveInformationModelGet)

        ae = AE(ae_title=self.calling_aet)
        handlers = [(evt.EVT_CONN_OPEN, _no_delay)]
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = TIMEOUT
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        roles = []
        if received is not None:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            for sop_class in classes:
                for syntax in TRANSFER_SYNTAXES:
                    ae.add_requested_context(sop_class, syntax)
            roles = [build_role(sop_class, scp_role=True) for sop_class in classes]

            def store(event) -> int:
                sop_uid = str(event.request.AffectedSOPInstanceUID)
                if sop_uid not in wanted:  # not asked for: an archive could send anything, endlessly
                    return SUCCESS
                data = bytes(event.encoded_dataset())
                received[sop_uid] = data if len(data) <= self.max_instance_bytes else RetrievalFailed(
                    f"not retrieved: {len(data):,} bytes, more than the {self.max_instance_bytes:,} allowed")
                return SUCCESS

            handlers.append((evt.EVT_C_STORE, store))
        for attempt in range(1, self.attempts + 1):
            assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, ext_neg=roles or None,
                                 evt_handlers=handlers, max_pdu=0)
            if assoc.is_established:
                return assoc
            if assoc.is_rejected:
                raise SourceError(f"{self.url} rejected the association from AE title {self.calling_aet}: the "
                                  f"archive must know it (and allow C-FIND and C-GET from it), and its own AE "
                                  f"title must be {self.called_aet}")
            if attempt < self.attempts:
                log.info("%s: no association, trying again (%d/%d)", self.url, attempt + 1, self.attempts)
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise SourceError(f"{self.url} stopped answering (no association after {self.attempts} tries): what was "
                          f"indexed stays; run mi-index again to resume")

    def _find(self, assoc, level: str, budget: ListingBudget, **keys: str) -> Iterator[Any]:
        """The identifiers a C-FIND at `level` answers (Study Root), within the listing's budget
        and this query's deadline (the association aborted past it)."""
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        deadline = time.monotonic() + self.find_deadline
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if time.monotonic() > deadline:
                assoc.abort()
                raise SourceError(f"{self.url} was still answering the {level} query after {self.find_deadline:g} s: "
                                  f"what was indexed stays; run mi-index again to resume")
            budget.take(1)
            if not status:  # an empty status: the association was aborted or timed out
                raise SourceError(f"{self.url} broke off the {level} query: it may not allow C-FIND from AE title "
                                  f"{self.calling_aet} (configure it on the archive), or it stopped answering (what "
                                  f"was indexed stays; run mi-index again to resume)")
            if status.Status in PENDING and identifier is not None:
                yield identifier
            elif status.Status != SUCCESS:
                raise SourceError(f"{self.url} refused the {level} query (status 0x{status.Status:04X})")

    # ---------------------------------------------------------------- Source
    def items(self) -> Iterator[Item]:
        assoc = self._associate()
        try:
            yield from self._listed(assoc)
        finally:
            assoc.release()

    def _listed(self, assoc) -> Iterator[Item]:
        study_keys = {"StudyInstanceUID": "", "StudyDate": self.filters.study_date or ""}
        # One query per modality: C-FIND has no OR across values of a non-UID attribute
        modalities = self.filters.modalities or ("",)
        budget = ListingBudget(self.url, self.max_listed)
        seen: set[str] = set()
        studies = []
        for modality in modalities:
            for study in self._find(assoc, "STUDY", budget, **study_keys, ModalitiesInStudy=modality):
                uid = self._uid(study, "StudyInstanceUID")
                if uid and uid not in seen:
                    seen.add(uid)
                    studies.append(uid)
        for study_uid in studies:
            series_uids = []
            for modality in modalities:
                for series in self._find(assoc, "SERIES", budget, StudyInstanceUID=study_uid, SeriesInstanceUID="",
                                         Modality=modality, BodyPartExamined=self.filters.body_part or ""):
                    uid = self._uid(series, "SeriesInstanceUID")
                    if uid and uid not in seen:
                        seen.add(uid)
                        series_uids.append(uid)
            for series_uid in series_uids:
                for instance in self._find(assoc, "IMAGE", budget, StudyInstanceUID=study_uid,
                                           SeriesInstanceUID=series_uid, SOPInstanceUID="", SOPClassUID=""):
                    sop_uid = self._uid(instance, "SOPInstanceUID")
                    if sop_uid:
                        sop_class = checked_uid(str(instance.get("SOPClassUID", "")), "SOPClassUID")[0]
                        if sop_class:
                            self._classes[sop_uid] = sop_class
                        key = instance_key(self.url, study_uid, series_uid, sop_uid)
                        yield Item(key, 0, version_token(key))

    def _uid(self, identifier: Any, keyword: str) -> str | None:
        """A UID of a C-FIND result; None, reported, when it is not one (it goes into keys)."""
        value = identifier.get(keyword, "")
        if value in ("", None):
            return None
        uid, why = checked_uid(str(value), keyword)
        if uid is None:
            self.refused.append((f"{self.url} (C-FIND result)", f"malformed record skipped: {why}"))
        return uid

    def read_many(self, items: Sequence[Item]) -> list[bytes | BaseException]:
        """The bytes of each item (or the error reading it), over one association for each
        MAX_CLASSES SOP classes among them."""
        classes = list(dict.fromkeys(self._classes.get(item.key.rsplit("/", 1)[-1]) for item in items))
        if None in classes:
            classes = list(dict.fromkeys([c for c in classes if c] + list(FALLBACK_CLASSES)))
        if len(classes) > MAX_CLASSES and len(items) > 1:
            half = len(items) // 2
            return self.read_many(items[:half]) + self.read_many(items[half:])
        # pynetdicom is latency-bound (a polling reactor): the group is shared among up to
        # `connections` associations at once
        chunks = [list(items[i::self.connections]) for i in range(min(self.connections, len(items)))]
        if len(chunks) == 1:
            return self._get(items, classes[:MAX_CLASSES])
        with ThreadPoolExecutor(len(chunks)) as pool:
            answers = list(pool.map(lambda chunk: self._get(chunk, classes[:MAX_CLASSES]), chunks))
        by_key = {item.key: data for chunk, answer in zip(chunks, answers) for item, data in zip(chunk, answer)}
        return [by_key[item.key] for item in items]

    def _get(self, items: Sequence[Item], classes: Sequence[str]) -> list[bytes | BaseException]:
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        results: list[bytes | BaseException] = []
        with self._slots:
            received: dict[str, Any] = {}
            assoc = None
            try:
                wanted = frozenset(item.key.rsplit("/", 1)[-1] for item in items)
                assoc = self._associate(received, classes, wanted)
                for item in items:
                    study_uid, series_uid, sop_uid = instance_uids(item.key)
                    query = Dataset()
                    query.QueryRetrieveLevel = "IMAGE"
                    query.StudyInstanceUID, query.SeriesInstanceUID = study_uid, series_uid
                    query.SOPInstanceUID = sop_uid
                    deadline = time.monotonic() + self.get_deadline
                    for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                        if time.monotonic() > deadline:
                            assoc.abort()
                            raise SourceError(f"{self.url} was still sending instance {sop_uid} after "
                                              f"{self.get_deadline:g} s: what was indexed stays; run mi-index "
                                              f"again to resume")
                        if not status:  # aborted or timed out
                            raise SourceError(f"{self.url} stopped answering while sending instances: what was "
                                              f"indexed stays; run mi-index again to resume")
                    data = received.pop(sop_uid, None)
                    results.append(data if data is not None else
                                   FileNotFoundError(f"{self.url} sent no instance {sop_uid} (gone from it?)"))
            except SourceError as error:
                results += [error] * (len(items) - len(results))
            finally:
                if assoc is not None and assoc.is_established:
                    assoc.release()
        return results


def _no_delay(event) -> None:
    """TCP_NODELAY on an association's socket: pynetdicom writes a PDU in pieces, and Nagle's
    algorithm with delayed acknowledgements held each C-FIND and C-GET up (listing 2x faster)."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def read_instance(key: str, calling_aet: str | None = None) -> bytes:
    """The bytes of one indexed DIMSE instance, by its key (a thumbnail for mi-serve); the
    calling AE title: MI_DIMSE_AET unless given, else MI-INDEX."""
    calling_aet = calling_aet or os.environ.get(AET_ENV) or DEFAULT_CALLING_AET
    source = DimseSource(service_url(key), calling_aet=calling_aet, connections=1, attempts=2)
    return source.read(Item(key, 0, version_token(key)))
