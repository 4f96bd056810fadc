"""A PACS as a source: list instances with QIDO-RS, retrieve each with WADO-RS (DICOMweb).

`mi-index dicomweb+https://pacs.example.org/dicom-web --modality CR,DX` indexes the instances
the server lists (filters applied by the server), decoded by the same decoder as files: the
server's copy of a file and the file give the same pixels, metadata and embedding.

- Key: the instance's WADO-RS URL behind a `dicomweb+` scheme (`indexer.pacs_keys`), never
  with credentials.
- Version token: an instance is immutable once its SOP Instance UID is issued, so the token is
  0 and a hash of the key; a re-run retrieves only instances the index lacks.
- Listing: studies -> series -> instances, each level paged with limit/offset until an empty
  page (a server may cap a page below the limit asked, so a short page proves nothing). A page
  that brings no UID new to its query (a server ignoring offset) ends that query, and the run
  then removes nothing; a listing past `max_listed` records stops the run (`indexer.sources.guards`).
  A malformed record is skipped with its reason; an answer that is not JSON stops the run.
- Bounds: each answer is read within a size cap (QIDO: `max_qido_bytes`; an instance:
  `max_instance_bytes`) and an overall deadline, not only a per-read timeout (`indexer.sources.http_limits`).
- Failures: a request is retried with backoff on 5xx, 408/429, timeouts and refused
  connections; when the server still fails, or refuses the credentials, the run stops with a
  `SourceError` (what was committed stays: the next run resumes). An instance the server no
  longer has (404) is one skipped item. An instance not received whole (cut short, over its cap
  or deadline, not DICOM by its content type) is not judged: it is reported as not retrieved and
  retrieved again by the next run (`RetrievalFailed`).
- Concurrency: retrievals run `connections` at a time at most, across all decoding processes
  (one semaphore); each process fetches its group of items on that many threads.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import SourceError, one_line
from ..extras import require
from ..pacs_keys import DICOMWEB_SCHEME, instance_key, is_dicomweb_url, service_url, wado_url
from .base import Item
from .guards import MAX_LISTED, ListingBudget, RetrievalFailed, record_uid
from .pacs import PacsSource, QueryFilters, version_token

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV, TOKEN_ENV = "MI_DICOMWEB_USER", "MI_DICOMWEB_PASSWORD", "MI_DICOMWEB_TOKEN"
PAGE_SIZE = 500                     # QIDO results asked per request
TIMEOUT = (10.0, 120.0)             # (connect, read) seconds per socket operation
QIDO_DEADLINE = 120.0               # seconds for a whole QIDO answer
WADO_DEADLINE = 600.0               # seconds for a whole instance (2 GB at 30 Mbit/s)
MAX_QIDO_BYTES = 64 << 20           # a page of 500 results is about 0.5 MB of JSON
MAX_INSTANCE_BYTES = 2 << 30        # an instance as received: 2 GiB
QIDO_HEADERS = {"Accept": "application/dicom+json, application/json"}
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# The instance as the archive stores it (transfer-syntax=*): the bytes of the file it received,
# so its content hash and decoding are the file's.
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# Instances are asked for uncompressed on the wire: requests offers gzip by default, and a server
# that takes it (Orthanc does) spends ~100 ms of CPU per 2 MB instance compressing pixels that
# hardly compress (measured: 100 ms per retrieval against 2 ms with identity).
WADO_HEADERS = {"Accept": WADO_ACCEPT, "Accept-Encoding": "identity"}


@dataclass(frozen=True)
class Credentials:
    """HTTP basic (user, password) or a bearer token; held in memory for the run, never stored."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, user: str | None = None, password: str | None = None, token: str | None = None
                ) -> Credentials:
        """Options first, then MI_DICOMWEB_USER / MI_DICOMWEB_PASSWORD / MI_DICOMWEB_TOKEN."""
        return cls(user or os.environ.get(USER_ENV) or None, password or os.environ.get(PASSWORD_ENV) or None,
                   token or os.environ.get(TOKEN_ENV) or None)


def base_url(text: str) -> str:
    """The normalised `dicomweb+http(s)://host[:port]/prefix` of a DICOMweb service. Raises
    SourceError for a URL that carries credentials (they would end up in the index's keys)."""
    if not is_dicomweb_url(text):
        raise SourceError(f"not a DICOMweb URL: {text} (write dicomweb+http://HOST:PORT/dicom-web, or https)")
    parts = urlsplit(text[len(DICOMWEB_SCHEME):])
    if parts.username or parts.password:
        raise SourceError(f"put credentials in --user/--password or {USER_ENV}/{PASSWORD_ENV} (or {TOKEN_ENV}), "
                          f"not in the URL: it names every indexed instance")
    if not parts.hostname:
        raise SourceError(f"no host in {text} (write dicomweb+http://HOST:PORT/dicom-web)")
    if parts.query or parts.fragment:
        raise SourceError(f"a DICOMweb URL names the service, without ?query or #fragment: {text} "
                          f"(filters are --modality, --study-date, --body-part)")
    return f"{DICOMWEB_SCHEME}{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


@dataclass
class DicomwebSource(PacsSource):
    """The instances a DICOMweb server lists (under `filters`), read over WADO-RS. Pickles
    without its HTTP session (each decoding process opens its own)."""

    url: str                               # dicomweb+http(s)://host[:port]/prefix
    filters: QueryFilters = QueryFilters()
    credentials: Credentials = Credentials()
    connections: int = 4
    verify: bool | str = True              # TLS verification; a CA bundle's path to trust a private CA
    attempts: int = 4                      # tries per request before the run stops
    backoff: float = 0.5                   # seconds before the 2nd try, doubled for each next one
    refused: list[tuple[str, str]] = field(default_factory=list)
    max_listed: int = MAX_LISTED           # records (studies, series, instances) a listing may hold
    allow_empty_listing: bool = False      # an empty listing may sweep what the index holds of it
    max_qido_bytes: int = MAX_QIDO_BYTES
    max_instance_bytes: int = MAX_INSTANCE_BYTES
    qido_deadline: float = QIDO_DEADLINE
    wado_deadline: float = WADO_DEADLINE

    def __post_init__(self) -> None:
        self.url = base_url(self.url)
        require("pacs", "requests", "indexing a PACS over DICOMweb")
        self._incomplete: list[str] = []   # queries whose listing ended early: nothing is swept
        self._http = self.url[len(DICOMWEB_SCHEME):]
        self._bound_retrievals()
        self._local: threading.local | None = None
        self._client_pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_local": None, "_client_pid": -1}

    # ---------------------------------------------------------------- HTTP
    def _session(self):
        """This thread's HTTP session (a requests session is not shared across threads or
        processes), with connections that `indexer.sources.http_limits` can bound. QIDO-RS and WADO-RS
        go through it directly: dicomweb-client reads answers whole, without a cap."""
        if self._local is None or self._client_pid != os.getpid():
            self._local, self._client_pid = threading.local(), os.getpid()
        session = getattr(self._local, "session", None)
        if session is None:
            from .http_limits import bounded_session

            session = bounded_session()
            session.verify = self.verify
            if self.credentials.token:
                session.headers["Authorization"] = f"Bearer {self.credentials.token}"
            elif self.credentials.user:
                session.auth = (self.credentials.user, self.credentials.password or "")
            self._local.session = session
        return session

    def _call(self, what: str, request: Callable[[Any], Any]) -> Any:
        """`request(session)` with retries and backoff on failures of the server or the network;
        SourceError when they persist or the credentials are refused. A 404 (gone meanwhile) is
        a FileNotFoundError, other HTTP errors an OSError; an answer cut short each time is an
        IncompleteBody, one over its cap or deadline a ResponseTooLarge or DeadlineExceeded
        (OSErrors, not retried: the same server would do the same again)."""
        import requests
        import urllib3

        from .http_limits import IncompleteBody

        for attempt in range(1, self.attempts + 1):
            try:
                return request(self._session())
            except IncompleteBody as e:
                if attempt == self.attempts:
                    raise
                cause = str(e)
            except requests.HTTPError as e:
                status = e.response.status_code if e.response is not None else 0
                if status in (401, 403):
                    raise SourceError(f"{self.url} refused the credentials (HTTP {status}): give --user and "
                                      f"--password (or {USER_ENV}/{PASSWORD_ENV}), or a token in {TOKEN_ENV}"
                                      ) from None
                if status == 404:
                    raise FileNotFoundError(f"HTTP 404 for {what}") from None
                if status not in RETRIED_STATUSES:
                    raise OSError(f"HTTP {status} for {what}") from None
                cause = f"HTTP {status}"
            except requests.exceptions.SSLError as e:
                raise SourceError(f"TLS failed for {self.url}: {one_line(e, 160)} (to trust a private CA, set "
                                  f"REQUESTS_CA_BUNDLE to its certificate file)") from None
            except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as e:
                # (urllib3's own errors come from reading a streamed body: a dropped connection)
                timed_out = isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError))
                cause = "timed out" if timed_out else "connection failed"
            if attempt < self.attempts:
                log.info("%s: %s, trying again (%d/%d)", what, cause, attempt + 1, self.attempts)
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise SourceError(f"{self.url} stopped answering ({cause}, {self.attempts} tries, {what}): what was indexed "
                          f"stays; run mi-index again to resume")

    def _qido(self, session: Any, what: str, path: str, params: dict[str, Any]) -> list:
        """One QIDO-RS answer: its records (none for a 204 or an empty body); SourceError for an
        answer that is not a JSON list of records."""
        from .http_limits import bounded_get

        response, body = bounded_get(session, f"{self._http}/{path}", params=params, headers=QIDO_HEADERS,
                                     max_bytes=self.max_qido_bytes, deadline=self.qido_deadline, timeout=TIMEOUT)
        if response.status_code == 204 or not body.strip():
            return []
        try:
            answer = json.loads(body)
        except ValueError:  # (UnicodeDecodeError too)
            raise SourceError(f"{self.url} answered {what} with something that is not JSON "
                              f"({response.headers.get('Content-Type', 'no content type')})") from None
        if isinstance(answer, dict):  # one record where a list belongs: tolerated, as dicomweb-client does
            return [answer]
        if not isinstance(answer, list):
            raise SourceError(f"{self.url} answered {what} with a JSON {type(answer).__name__}, not a list of records")
        return answer

    def _pages(self, what: str, path: str, params: dict[str, Any], uid_tag: str, budget: ListingBudget
               ) -> Iterator[str]:
        """The UIDs (at `uid_tag`) a QIDO-RS search lists, page after page until an empty page,
        each once. A page with no UID new to this search (a server ignoring offset, or sending
        only malformed records) ends it, recorded as incomplete; malformed records are reported."""
        offset, seen, malformed = 0, set(), []
        while True:
            page = self._call(what, lambda session: self._qido(session, what, path,
                                                               {**params, "limit": PAGE_SIZE, "offset": offset}))
            if not page:
                break
            budget.take(len(page))
            fresh = []
            for record in page:
                uid, why = record_uid(record, uid_tag)
                if uid is None:
                    malformed.append(why)
                elif uid not in seen:
                    seen.add(uid)
                    fresh.append(uid)
            if not fresh:
                self._incomplete.append(what)
                self.refused.append((f"{self.url} ({what})", f"listing stopped at offset {offset}: the page held no "
                                     f"record not listed before (does the server ignore offset?); nothing is "
                                     f"removed from the index this run"))
                break
            yield from fresh
            offset += len(page)
        if malformed:
            self.refused.append((f"{self.url} ({what})", f"{len(malformed)} malformed record(s) skipped: "
                                 f"{malformed[0]}"))

    # ---------------------------------------------------------------- Source
    def items(self) -> Iterator[Item]:
        study_filters, series_filters = self.filters.study_params(), self.filters.series_params()
        self._incomplete.clear()
        budget = ListingBudget(self.url, self.max_listed)
        try:
            studies = list(self._pages("listing studies", "studies", study_filters, "0020000D", budget))
        except OSError as e:  # a 400 for a query it cannot answer, a 404 for a wrong prefix
            raise SourceError(f"{self.url} did not answer the study query ({one_line(e)}): is it the DICOMweb "
                              f"root (Orthanc: .../dicom-web)?") from None
        # A UID can come twice (Orthanc lists a study UID once per patient that has it): listed once
        seen: set[str] = set()
        for study_uid in studies:
            for series_uid in self._listed(f"listing series of study {study_uid}", f"studies/{study_uid}/series",
                                           series_filters, "0020000E", budget):
                if series_uid in seen:
                    continue
                seen.add(series_uid)
                for sop_uid in self._listed(f"listing instances of series {series_uid}",
                                            f"studies/{study_uid}/series/{series_uid}/instances", {}, "00080018",
                                            budget):
                    key = instance_key(self.url, study_uid, series_uid, sop_uid)
                    yield Item(key, 0, version_token(key))

    def _listed(self, what: str, path: str, params: dict[str, Any], uid_tag: str, budget: ListingBudget
                ) -> Iterator[str]:
        """A study's series or a series' instances; none when the server no longer has the
        parent (deleted while listing: its instances are gone). Any other refusal stops the run:
        taking it for an empty listing would sweep what the index holds."""
        try:
            yield from self._pages(what, path, params, uid_tag, budget)
        except FileNotFoundError as e:
            log.info("%s: %s", what, e)
        except OSError as e:
            raise SourceError(f"{self.url} refused {what} ({one_line(e)})") from None

    def sweepable(self, key: str) -> bool:
        # Listing failures stop the run before anything is swept; a listing that ended early
        # (a repeated page) sweeps nothing
        return not self._incomplete

    def read_many(self, items: Sequence[Item]) -> list[bytes | BaseException]:
        """The bytes of each item (or the exception reading it raised), fetched concurrently:
        the latency of the server, not its bandwidth, bounds one request."""
        if len(items) == 1:
            return [self._retrieve(items[0])]
        with ThreadPoolExecutor(min(self.connections, len(items))) as pool:
            futures = [pool.submit(self._retrieve, item) for item in items]
        return [future.result() if future.exception() is None else future.exception() for future in futures]

    def _retrieve(self, item: Item) -> bytes:
        """The instance's bytes, once received whole. Gone (404): unreadable, swept by the next
        run. Refused otherwise (a 406 for the transfer syntax, say), or not received whole:
        RetrievalFailed, tried again next run, not taken for the item's fault."""
        from .http_limits import bounded_get

        url = wado_url(item.key)

        def get(session) -> bytes:
            with self._slots:
                # The session directly, not retrieve_instance (it parses a dataset; the indexer
                # needs the archive's bytes), read in chunks of 4 MB: requests' `.content` reads in
                # 10 kB chunks, 10 ms of CPU per 2 MB instance
                response, body = bounded_get(session, url, headers=WADO_HEADERS, timeout=TIMEOUT,
                                             max_bytes=self.max_instance_bytes, deadline=self.wado_deadline)
            return whole_instance(body, response.headers)

        try:
            return self._call(f"retrieving {item.key}", get)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise RetrievalFailed(f"not retrieved: {one_line(e, 200)} (tried again next run)") from None


def read_instance(key: str, credentials: Credentials | None = None) -> bytes:
    """The bytes of one indexed PACS instance, by its key (a thumbnail for mi-serve, say).
    Credentials: the environment's unless given. Raises SourceError, or OSError / DecodeError
    for an instance the server no longer has or refuses."""
    source = DicomwebSource(service_url(key), credentials=credentials or Credentials.resolve(), connections=1,
                            attempts=2)
    return source.read(Item(key, 0, version_token(key)))


def whole_instance(body: bytes, headers: Any) -> bytes:
    """The instance in a WADO-RS answer, only from an answer known to be whole: multipart/related
    (of application/dicom) closed by its final boundary, or a bare application/dicom body (tolerated)
    whose end was declared (Content-Length, checked on reading, or chunked). OSError otherwise:
    an HTML error page with status 200, a body cut by a closed connection."""
    content_type = headers.get("Content-Type", "")
    media, params = _media_type(content_type)
    if media == "multipart/related" and params.get("type", "application/dicom").lower() == "application/dicom":
        return first_part(body, content_type)
    if media == "application/dicom":
        declared = "Content-Length" in headers or "chunked" in headers.get("Transfer-Encoding", "").lower()
        if not declared:
            raise OSError("the answer did not declare its length, so it may be cut short")
        return body
    raise OSError(f"the server answered {media or 'with no content type'}, not DICOM")


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    media, _, rest = content_type.partition(";")
    params = {name.strip().lower(): value.strip().strip('"') for name, _, value in
              (param.partition("=") for param in rest.split(";")) if name.strip()}
    return media.strip().lower(), params


def first_part(body: bytes, content_type: str) -> bytes:
    """The first part of a multipart/related answer (WADO-RS sends one per instance), from an
    answer closed by its final boundary (`--boundary--`); OSError for one cut short."""
    boundary = _media_type(content_type)[1].get("boundary", "")
    marker = b"--" + boundary.encode()
    start = body.find(marker) if boundary else -1
    head_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    end = body.find(b"\r\n" + marker, head_end) if head_end >= 0 else -1
    if end < 0 or body.find(b"\r\n" + marker + b"--", end) < 0:
        raise OSError("the server sent no whole instance (a multipart answer cut short)")
    return body[head_end + 4:end]


