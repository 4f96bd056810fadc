"""A hostile or broken PACS cannot make mi-index run forever, fill memory, lose instances or
print a traceback: fake DICOMweb servers on loopback (paging ignored, endless studies, gzip
bombs, one byte at a time, HTML in place of DICOM, cut bodies, 204 listings, malformed JSON), a
real Orthanc behind a proxy where a whole run is needed, and the optional extras missing."""
from __future__ import annotations

import gzip
import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import indexer
from indexer.sources.dicomweb import DicomwebSource
from indexer.errors import SourceError
from indexer.sources.guards import RetrievalFailed
from indexer.sources import Item
from orthanc_server import MISSING, Orthanc, dicom_files, rows, stocked

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
REPO = Path(__file__).parents[1]
needs_orthanc = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


class Hostile:
    """A DICOMweb server on a free loopback port: `answer(handler)` writes each response raw
    (HTTP/1.0: the connection closes after it). Counts the requests; stopped by `close`."""

    def __init__(self, answer) -> None:
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests += 1
                try:
                    answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what the test wants

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"dicomweb+http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile():
    servers = []

    def start(answer) -> Hostile:
        servers.append(Hostile(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def send(handler, body: bytes, content_type: str = "application/dicom+json", status: int = 200,
         length: bool = True, **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def study(uid: str) -> dict:
    return {"0020000D": {"vr": "UI", "Value": [uid]}}


def offset_of(handler) -> int:
    from urllib.parse import parse_qs, urlsplit
    return int(parse_qs(urlsplit(handler.path).query).get("offset", ["0"])[0])


# ------------------------------------------------------------------ paging
@pytest.mark.parametrize("later_page", ["same page", "error object"])
def test_a_server_ignoring_offset_ends_the_listing_and_sweeps_nothing(hostile, later_page):
    def answer(handler) -> None:
        if "/series" in handler.path or server.requests > 50:  # (a listing that asks forever: ended, so
            return send(handler, b"[]")                           # that the test fails, not hangs)
        if offset_of(handler) and later_page == "error object":
            return send(handler, json.dumps({"error": "offset is not supported"}).encode())
        send(handler, json.dumps([study("1.2.3"), study("1.2.4")]).encode())

    server = hostile(answer)
    source = DicomwebSource(server.url, attempts=1)
    assert list(source.items()) == []
    assert server.requests <= 4  # 2 study pages, 2 series listings
    assert not source.sweepable(f"{source.url}/studies/1.2.5/series/1/instances/1")
    reasons = " ".join(reason for _, reason in source.refused)
    assert "ignore offset" in reasons and "nothing is removed" in reasons, source.refused


def test_a_server_making_up_studies_forever_stops_at_the_cap(hostile):
    def answer(handler) -> None:
        if "/series" in handler.path or offset_of(handler) >= 2000:
            return send(handler, b"[]")
        offset = offset_of(handler)
        send(handler, json.dumps([study(f"1.2.{offset + i}") for i in range(500)]).encode())

    server = hostile(answer)
    source = DicomwebSource(server.url, attempts=1, max_listed=1000)
    with pytest.raises(SourceError, match=r"listed more than 1,000 records .* --max-listed"):
        list(source.items())
    assert server.requests == 3


# ------------------------------------------------------------------ size and time
def test_a_gzip_bomb_is_refused_at_the_cap(hostile):
    bomb = gzip.compress(b"[" + b" " * (64 << 20) + b"]", compresslevel=9)  # 64 MB in ~65 KB
    assert len(bomb) < 200_000

    def answer(handler) -> None:
        send(handler, bomb, Content_Encoding="gzip")

    server = hostile(answer)
    source = DicomwebSource(server.url, attempts=1, max_qido_bytes=1 << 20)
    with pytest.raises(SourceError, match="more than the 1,048,576 bytes allowed"):
        list(source.items())


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_server_dripping_bytes_meets_the_deadline(hostile, where):
    def answer(handler) -> None:
        if where == "headers":
            handler.wfile.write(b"HTTP/1.0 200 OK\r\n")
            for byte in b"X-Slow: " + b"a" * 40:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(0.25)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "application/dicom+json")
        handler.end_headers()
        for byte in b"[" + b" " * 40 + b"]":  # 10 s in all, while every read comes within 0.25 s
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.25)

    server = hostile(answer)
    source = DicomwebSource(server.url, attempts=1, qido_deadline=1.5)
    with pytest.raises(SourceError, match=r"no whole answer within 1.5 s"):
        list(source.items())


# ------------------------------------------------------------------ what a retrieval may judge
MULTIPART = 'multipart/related; type="application/dicom"; boundary=XYZ'
PART = b"--XYZ\r\nContent-Type: application/dicom\r\n\r\n" + b"DICM" * 100 + b"\r\n"


@pytest.mark.parametrize("answer", [
    lambda h: send(h, b"<html>log in first</html>", "text/html"),
    lambda h: send(h, b"\0" * 128 + b"DICM" + b"\0" * 500, "application/dicom", length=False),  # closed: cut?
    lambda h: send(h, PART, MULTIPART),                                              # no closing boundary
    lambda h: (send(h, b"", "application/dicom", Content_Length="100000", length=False),
               h.wfile.write(b"\0" * 5000)),                                         # closed at 5,000 of 100,000
], ids=["html with 200", "bare body of unknown length", "multipart not closed", "shorter than its length"])
def test_an_answer_not_received_whole_is_not_judged(hostile, answer):
    server = hostile(answer)
    source = DicomwebSource(server.url, attempts=2, backoff=0)
    key = f"{source.url}/studies/1/series/2/instances/3"
    with pytest.raises(RetrievalFailed, match="not retrieved.*tried again next run"):
        source.read(Item(key, 0, 0))


def test_a_whole_answer_is_accepted(hostile):
    server = hostile(lambda h: send(h, PART + b"--XYZ--\r\n", MULTIPART))
    source = DicomwebSource(server.url, attempts=1)
    assert source.read(Item(f"{source.url}/studies/1/series/2/instances/3", 0, 0)) == b"DICM" * 100


# ------------------------------------------------------------------ malformed QIDO
@pytest.mark.parametrize("page", [[{"0020000D": "1.2.3"}], [{"0020000D": {"vr": "UI", "Value": 5}}], [None],
                                  [{"0020000D": {"Value": ["../../admin?x="]}}]],
                         ids=["attribute a string", "Value a number", "null record", "not a UID"])
def test_a_malformed_record_is_skipped_with_its_reason(hostile, page):
    server = hostile(lambda h: send(h, json.dumps(page if not offset_of(h) else []).encode()))
    source = DicomwebSource(server.url, attempts=1)
    assert list(source.items()) == []
    assert any("malformed record" in reason for _, reason in source.refused), source.refused


def test_an_answer_that_is_not_json_is_one_line(hostile, tmp_path):
    server = hostile(lambda h: send(h, b"<html>maintenance</html>", "text/html"))
    result = subprocess.run([sys.executable, "-c", "from indexer.cli import main; main()", server.url,
                             "--index", str(tmp_path / "index")], capture_output=True, text=True, timeout=120,
                            env=_env(MI_MODEL=str(FIXTURE)))
    assert result.returncode == 1
    message = result.stderr.strip()
    assert "not JSON" in message and len(message.splitlines()) == 1 and "Traceback" not in message, message


# ------------------------------------------------------------------ whole runs against Orthanc
class Proxy:
    """In front of Orthanc: `mode` "html" answers every retrieval with a 200 HTML page, "empty"
    answers the study listing with a 204; otherwise it forwards."""

    def __init__(self, target: str) -> None:
        self.mode = ""
        proxy = self

        def answer(handler) -> None:
            retrieval = "/instances/" in handler.path and "?" not in handler.path
            if retrieval and proxy.mode == "html":
                return send(handler, b"<html>session expired</html>", "text/html")
            if handler.path.split("?")[0].endswith("/dicom-web/studies") and proxy.mode == "empty":
                handler.send_response(204)
                return handler.end_headers()
            request = urllib.request.Request(target + handler.path, headers={
                k: v for k, v in handler.headers.items() if k.lower() == "accept"})
            with urllib.request.urlopen(request) as forwarded:
                send(handler, forwarded.read(), forwarded.headers["Content-Type"], forwarded.status)

        self.hostile = Hostile(answer)
        self.url = self.hostile.url


@pytest.fixture(scope="module")
def model():
    from encoders import load_model
    return load_model(FIXTURE, device="cpu", towers=("image",))


@pytest.fixture
def proxied(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    proxy = Proxy(orthanc.root)
    yield orthanc, proxy
    proxy.hostile.close()
    orthanc.stop()


@needs_orthanc
def test_an_html_answer_is_retried_next_run_not_recorded(tmp_path, model, proxied):
    orthanc, proxy = proxied
    ids = stocked(orthanc, dicom_files(3))
    proxy.mode = "html"
    first = indexer.index_dicomweb(proxy.url, tmp_path / "index", model=model, workers=0)
    assert (first["not_retrieved"], first["skipped"], first["images"]) == (len(ids), 0, 0)
    assert all("answered text/html, not DICOM" in row["reason"] for row in first["skipped_files"])
    proxy.mode = ""
    second = indexer.index_dicomweb(proxy.url, tmp_path / "index", model=model, workers=0)
    assert (second["new"], second["skipped"], second["not_retrieved"]) == (len(ids), 0, 0)
    assert len(rows(tmp_path / "index")) == len(ids)


@needs_orthanc
def test_an_empty_listing_sweeps_nothing_unless_asked(tmp_path, model, proxied):
    orthanc, proxy = proxied
    ids = stocked(orthanc, dicom_files(3))
    indexer.index_dicomweb(proxy.url, tmp_path / "index", model=model, workers=0)
    proxy.mode = "empty"
    result = subprocess.run([sys.executable, "-c", "from indexer.cli import main; main()", proxy.url,
                             "--index", str(tmp_path / "index")], capture_output=True, text=True, timeout=300,
                            env=_env(MI_MODEL=str(FIXTURE)))
    assert result.returncode == 1
    message = result.stderr.strip()
    assert "listed nothing" in message and "--allow-empty-listing" in message, message
    assert len(message.splitlines()) == 1
    assert len(rows(tmp_path / "index")) == len(ids)  # nothing removed
    emptied = indexer.index_dicomweb(proxy.url, tmp_path / "index", model=model, workers=0,
                                     allow_empty_listing=True)
    assert emptied["removed"] == len(ids) and not rows(tmp_path / "index")


@needs_orthanc
def test_a_dimse_listing_stops_at_the_cap(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc", extra={"DicomModalities": {"mi": ["MI-INDEX", "127.0.0.1", 1]}}).start()
    try:
        stocked(orthanc, dicom_files(3))
        from indexer.sources.dimse import DimseSource
        with pytest.raises(SourceError, match="listed more than 2 records"):
            list(DimseSource(orthanc.dimse_url, max_listed=2).items())
        assert len(list(DimseSource(orthanc.dimse_url).items())) >= 3
    finally:
        orthanc.stop()


# ------------------------------------------------------------------ the pacs extra missing
def _env(**extra: str) -> dict[str, str]:
    import os
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


@pytest.mark.parametrize("url, module", [("dicomweb+http://127.0.0.1:9/dicom-web", "requests"),
                                         ("dimse://ARCHIVE@127.0.0.1:9", "pynetdicom")])
def test_a_missing_pacs_extra_is_one_line_naming_it(tmp_path, url, module):
    code = f"import sys; sys.modules[{module!r}] = None; from indexer.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, url, "--index", str(tmp_path / "index")],
                            capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 1
    message = result.stderr.strip()
    assert 'pip install "medimageinsight-search[pacs]"' in message and module in message, message
    assert len(message.splitlines()) == 1 and not (tmp_path / "index").exists()
