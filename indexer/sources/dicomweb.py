"""A PACS as a source: list instances with QIDO-RS, retrieve each with WADO-RS (DICOMweb).

`mi-index dicomweb+https://pacs.example.org/dicom-web --modality CR,DX` indexes the instances
the server lists (filters applied by the server), decoded by the same decoder as files: the
server's copy of a file and the file give the same pixels, metadata and embedding.

- Key: the instance's WADO-RS URL behind a `dicomweb+` scheme (`indexer.pacs_keys`), never
  with credentials.
- Version token: an instance is immutable once its SOP Instance UID is issued, so the token is
  0 and a hash of the key; a re-run retrieves only instances the index lacks.
- Listing: studies -> series -> instances, each level paged with limit/offset until an empty
  page (a server may cap a page below the limit asked, so a short page proves nothing).
- Failures: a request is retried with backoff on 5xx, 408/429, timeouts and refused
  connections; when the server still fails, or refuses the credentials, the run stops with a
  `SourceError` (what was committed stays: the next run resumes). An instance the server no
  longer has (404) is one skipped item.
- Concurrency: retrievals run `connections` at a time at most, across all decoding processes
  (one semaphore); each process fetches its group of items on that many threads.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..decode import TransientDecodeError
from ..errors import SourceError, one_line
from ..pacs_keys import DICOMWEB_SCHEME, instance_key, is_dicomweb_url, service_url, wado_url
from .base import Item
from .pacs import PacsSource, QueryFilters, version_token

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV, TOKEN_ENV = "MI_DICOMWEB_USER", "MI_DICOMWEB_PASSWORD", "MI_DICOMWEB_TOKEN"
PAGE_SIZE = 500                     # QIDO results asked per request
TIMEOUT = (10.0, 120.0)             # (connect, read) seconds per request
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


def _uid(result: dict[str, Any], tag: str) -> str | None:
    values = (result.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


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

    def __post_init__(self) -> None:
        self.url = base_url(self.url)
        self._http = self.url[len(DICOMWEB_SCHEME):]
        self._bound_retrievals()
        self._local: threading.local | None = None
        self._client_pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_local": None, "_client_pid": -1}

    # ---------------------------------------------------------------- HTTP
    def _client(self):
        """This thread's DICOMweb client (a requests session is not shared across threads or processes)."""
        if self._local is None or self._client_pid != os.getpid():
            self._local, self._client_pid = threading.local(), os.getpid()
        client = getattr(self._local, "client", None)
        if client is None:
            import requests
            from dicomweb_client import DICOMwebClient

            session = requests.Session()
            session.verify = self.verify
            if self.credentials.token:
                session.headers["Authorization"] = f"Bearer {self.credentials.token}"
            elif self.credentials.user:
                session.auth = (self.credentials.user, self.credentials.password or "")
            client = DICOMwebClient(self._http, session=session, timeout=TIMEOUT)
            client.set_http_retry_params(retry=False)  # retried here, on more causes (5xx, refused connections)
            self._local.client, self._local.session = client, session
        return client

    def _call(self, what: str, request: Callable[[Any], Any]) -> Any:
        """`request(client)` with retries and backoff on failures of the server or the network;
        SourceError when they persist or the credentials are refused. A 404 (gone meanwhile) is
        a FileNotFoundError, other HTTP errors an OSError."""
        import requests
        import urllib3

        for attempt in range(1, self.attempts + 1):
            try:
                return request(self._client())
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

    def _pages(self, what: str, search: str, **kwargs: Any) -> Iterator[dict]:
        """Every result of a QIDO-RS search (a DICOMwebClient method's name), page after page,
        until an empty page."""
        offset = 0
        while True:
            page = self._call(what, lambda client: getattr(client, search)(offset=offset, limit=PAGE_SIZE, **kwargs))
            if not page:
                return
            yield from page
            offset += len(page)

    # ---------------------------------------------------------------- Source
    def items(self) -> Iterator[Item]:
        study_filters, series_filters = self.filters.study_params(), self.filters.series_params()
        try:
            studies = list(self._pages("listing studies", "search_for_studies", search_filters=study_filters))
        except OSError as e:  # a 400 for a query it cannot answer, a 404 for a wrong prefix
            raise SourceError(f"{self.url} did not answer the study query ({e}): is it the DICOMweb root "
                              f"(Orthanc: .../dicom-web)?") from None
        # A UID can come twice (Orthanc lists a study UID once per patient that has it): listed once
        seen: set[str] = set()
        for study in studies:
            study_uid = _uid(study, "0020000D")
            if not study_uid or study_uid in seen:
                continue
            seen.add(study_uid)
            for series in self._listed(f"listing series of study {study_uid}", "search_for_series",
                                       study_instance_uid=study_uid, search_filters=series_filters):
                series_uid = _uid(series, "0020000E")
                if not series_uid or series_uid in seen:
                    continue
                seen.add(series_uid)
                for instance in self._listed(f"listing instances of series {series_uid}",
                                             "search_for_instances",
                                             study_instance_uid=study_uid, series_instance_uid=series_uid):
                    sop_uid = _uid(instance, "00080018")
                    if sop_uid:
                        key = instance_key(self.url, study_uid, series_uid, sop_uid)
                        yield Item(key, 0, version_token(key))

    def _listed(self, what: str, search: str, **kwargs: Any) -> Iterator[dict]:
        """A study's series or a series' instances; none when the server no longer has the
        parent (deleted while listing: its instances are gone). Any other refusal stops the run:
        taking it for an empty listing would sweep what the index holds."""
        try:
            yield from self._pages(what, search, **kwargs)
        except FileNotFoundError as e:
            log.info("%s: %s", what, e)
        except OSError as e:
            raise SourceError(f"{self.url} refused {what} ({e})") from None

    def read_many(self, items: Sequence[Item]) -> list[bytes | BaseException]:
        """The bytes of each item (or the exception reading it raised), fetched concurrently:
        the latency of the server, not its bandwidth, bounds one request."""
        if len(items) == 1:
            return [self._retrieve(items[0])]
        with ThreadPoolExecutor(min(self.connections, len(items))) as pool:
            futures = [pool.submit(self._retrieve, item) for item in items]
        return [future.result() if future.exception() is None else future.exception() for future in futures]

    def _retrieve(self, item: Item) -> bytes:
        """The instance's bytes. Gone (404): unreadable, swept by the next run. Refused otherwise
        (a 406 for the transfer syntax, say): tried again next run, not taken for the item's fault."""
        url = wado_url(item.key)

        def get(_client) -> bytes:
            session = self._local.session  # this thread's, made with its client
            with self._slots:
                # The session directly, not retrieve_instance (it parses a dataset; the indexer
                # needs the archive's bytes), read in one call: requests' `.content` reads in 10 kB
                # chunks, 10 ms of CPU per 2 MB instance
                response = session.get(url, headers=WADO_HEADERS, timeout=TIMEOUT, stream=True)
                with response:
                    response.raise_for_status()
                    body = response.raw.read(decode_content=True)
            return first_part(body, response.headers.get("Content-Type", ""))

        try:
            return self._call(f"retrieving {item.key}", get)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise TransientDecodeError(f"the server refused it: {e} (tried again next run)") from None


def read_instance(key: str, credentials: Credentials | None = None) -> bytes:
    """The bytes of one indexed PACS instance, by its key (a thumbnail for mi-serve, say).
    Credentials: the environment's unless given. Raises SourceError, or OSError / DecodeError
    for an instance the server no longer has or refuses."""
    source = DicomwebSource(service_url(key), credentials=credentials or Credentials.resolve(), connections=1,
                            attempts=2)
    return source.read(Item(key, 0, version_token(key)))


def first_part(body: bytes, content_type: str) -> bytes:
    """The first part of a multipart/related answer (WADO-RS sends one per instance), or the body
    of a server that sends the instance bare (application/dicom: tolerated)."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/related":
        return body
    boundary = next((value.strip().strip('"') for name, _, value in
                     (param.strip().partition("=") for param in params.split(";")) if name.lower() == "boundary"), "")
    marker = b"--" + boundary.encode()
    start = body.find(marker) if boundary else -1
    head_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    end = body.find(b"\r\n" + marker, head_end) if head_end >= 0 else -1
    if end < 0:
        raise OSError("the server sent no whole instance (a truncated multipart answer)")
    return body[head_end + 4:end]


