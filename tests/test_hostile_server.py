"""mi-serve against hostile clients and a hostile world: huge and endless bodies refused from their headers or
as they stream (bounded memory), DNS rebinding and cross-origin POSTs, a slow PACS behind the thumbnails,
oversized label lists, a file name that is not UTF-8, non-finite weights, a stale or shared thumbnail cache,
a wrong --model, a second server on one index, server paths in errors, and /docs offline. Real mi-serve
processes on free loopback ports (stopped by PID) and real sockets."""
from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.server import create_app

from raw_sqlite import raw_db
from servers import FIXTURE, build_archive, command_env, start_server, stop_server

ODD_NAME = os.fsdecode(b"scan-\xff.png")  # a file name that is not UTF-8 (byte 0xff)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The shared archive plus a PNG whose file name holds byte 0xff."""
    import indexer

    built = build_archive(tmp_path_factory.mktemp("hostile"))
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(built["data"] / ODD_NAME, format="PNG")
    indexer.index_paths([built["data"]], built["index"], model=built["model"], workers=0)
    return built


@pytest.fixture(scope="module")
def served(archive):
    served = start_server(archive["index"])
    yield served
    stop_server(served.process)


def copy_of(index: Path, folder: Path) -> Path:
    """The index copied (no thumbnails, no server file): a server of its own beside the module's."""
    shutil.copytree(index, folder / "index", ignore=shutil.ignore_patterns("thumbnails", "server.json"))
    return folder / "index"


def port_of(url: str) -> int:
    return urllib.parse.urlsplit(url).port


def ask(url: str, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), response
    finally:
        connection.close()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


STARTS = {"/api/query": b'{"terms": [{"kind": "image", "name": "big.png", "data": "',
          "/api/search": b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
                         b'Content-Type: image/png\r\n\r\n'}


def stream_body(port: int, head: str, limit_bytes: int, start: bytes = b"") -> tuple[int, bytes]:
    """Send `head`, then a chunked body (`start`, then "0"s: 1 MB a chunk) until the server answers or
    `limit_bytes` are sent; (bytes sent, the answer's first bytes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + (b"%x\r\n%s\r\n" % (len(start), start) if start else b""))
    chunk = b"100000\r\n" + b"0" * 0x100000 + b"\r\n"
    sent, pending, answer = 0, b"", b""
    sock.setblocking(False)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < limit_bytes else [], [], 5)
            if readable:
                try:
                    answer = sock.recv(65536)
                except ConnectionResetError:
                    pass
                break
            if writable:
                if not pending:
                    pending, sent = chunk, sent + 0x100000
                try:
                    pending = pending[sock.send(pending):]
                except (BrokenPipeError, ConnectionResetError):
                    break
            elif sent >= limit_bytes:
                break  # all sent and no answer within 5 s
    finally:
        sock.close()
    return sent, answer


# ------------------------------------------------------------------ 1. bodies refused before they are read
def test_huge_bodies_are_refused_from_their_headers_and_as_they_stream(archive, tmp_path):
    # 127.1 is not loopback by its spelling: a token is needed
    served = start_server(copy_of(archive["index"], tmp_path), "--host", "127.1")
    try:
        assert served.token
        port, pid = port_of(served.url), served.process.pid
        host = f"127.1:{port}"
        before = peak_rss_mb(pid)
        # No token: refused from the headers, the declared gigabyte never read.
        status, body, _ = ask(served.url, "POST", "/api/query", {"Host": host, "Content-Length": str(1 << 30),
                                                                  "Content-Type": "application/json"})
        assert status == 401 and "token" in json.loads(body)["error"]
        sent, answer = stream_body(port, f"POST /api/search HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/"
                                         "form-data; boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n", 300 << 20)
        assert answer.startswith(b"HTTP/1.1 401") and sent < 64 << 20, (sent, answer[:80])
        auth = f"Authorization: Bearer {served.token}\r\n"
        # With the token: a declared size over the limit is 413 at once; an undeclared one as it passes it.
        status, body, _ = ask(served.url, "POST", "/api/query", {"Host": host, "Content-Length": str(1 << 30),
                                                                  "Authorization": f"Bearer {served.token}"})
        assert status == 413 and "over" in json.loads(body)["error"]
        for path, kind in (("/api/query", "application/json"),
                           ("/api/search", "multipart/form-data; boundary=x")):
            sent, answer = stream_body(port, f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: {kind}"
                                             "\r\nTransfer-Encoding: chunked\r\n\r\n", 400 << 20, STARTS[path])
            assert answer.startswith(b"HTTP/1.1 413") and sent < 160 << 20, (path, sent, answer[:80])
        assert peak_rss_mb(pid) - before < 600, (before, peak_rss_mb(pid))
        bearer = {"Host": host, "Authorization": f"Bearer {served.token}"}
        status, body, _ = ask(served.url, "GET", "/api/health", bearer)
        assert status == 200 and json.loads(body)["ready"]
    finally:
        stop_server(served.process)


# ------------------------------------------------------------------ 3. Host names and origins
def test_other_host_names_and_cross_origin_posts_are_refused(served):
    port = port_of(served.url)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert ask(served.url, "GET", "/api/health", {"Host": host})[0] == 200, host
    for host in ("attacker.example.com", f"attacker.example.com:{port}", f"localhost:{port + 1}"):
        status, body, _ = ask(served.url, "GET", "/api/images/1/thumbnail", {"Host": host})
        assert status == 421 and "Host" in json.loads(body)["error"], host
    form = b"--x\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\nx\r\n--x--\r\n"
    kind = {"Content-Type": "multipart/form-data; boundary=x", "Host": f"127.0.0.1:{port}"}
    status, body, _ = ask(served.url, "POST", "/api/search", {**kind, "Origin": "http://attacker.example.com"}, form)
    assert status == 403 and "cross-origin" in json.loads(body)["error"]
    status, _, _ = ask(served.url, "POST", "/api/search", {**kind, "Origin": f"http://127.0.0.1:{port}"}, form)
    assert status == 422  # its own page's origin gets through (to the missing image)


# ------------------------------------------------------------------ 4, 5, 7, 10. what requests may hold
def test_every_route_enforces_the_label_limit(served, archive):
    labels = ",".join(f"label{i}" for i in range(300))
    png = (archive["data"] / "png1.png").read_bytes()
    client = TestClient(create_app(archive["index"], model=archive["model"]))
    answers = [client.get("/api/search", params={"q": "x", "labels": labels}),
               client.post("/api/search", data={"labels": labels}, files={"image": ("q.png", png)}),
               client.post("/api/query", json={"terms": [{"kind": "text", "text": "x"}], "labels": labels}),
               client.get("/api/images/1/labels", params={"labels": labels})]
    for response in answers:
        assert response.status_code == 400 and response.json()["error"] == "at most 256 labels, not 300"


def test_a_file_name_that_is_not_utf8_is_served_losslessly(served, archive):
    status, body, _ = ask(served.url, "GET", "/api/search?q=x&k=20")
    assert status == 200, body[:200]
    (odd,) = [hit for hit in json.loads(body) if os.fsencode(hit["path"]).endswith(b"scan-\xff.png")]
    for path in (f"/api/search?like={odd['id']}&k=3", f"/api/images/{odd['id']}"):
        status, body, _ = ask(served.url, "GET", path)
        assert status == 200, (path, body[:200])
        first = json.loads(body)[0] if path.startswith("/api/search") else json.loads(body)
        assert os.fsencode(first["path"]) == os.fsencode(archive["data"] / ODD_NAME), path
    png = (archive["data"] / ODD_NAME).read_bytes()
    client = TestClient(create_app(archive["index"], model=archive["model"]))
    upload = client.post("/api/search", files={"image": ("q.png", png)}, data={"k": "1"})
    assert upload.status_code == 200
    assert os.fsencode(upload.json()[0]["path"]) == os.fsencode(archive["data"] / ODD_NAME)


def test_bad_values_are_one_line_400s_naming_only_what_was_sent(served, archive):
    for query in ("q=x&under=%00", "q=1e999:chest", "q=chest+-+1e400:x", "q=chest&min_score=nan",
                  "like=1&under=%00"):
        status, body, _ = ask(served.url, "GET", f"/api/search?{query}")
        assert status == 400 and len(body.splitlines()) == 1 and json.loads(body)["error"], query
    status, body, _ = ask(served.url, "POST", "/api/query", {"Content-Type": "application/json"},
                          b'{"terms": [{"kind": "text", "text": "x", "weight": NaN}]}')
    assert status == 400 and "finite" in json.loads(body)["error"]
    client = TestClient(create_app(archive["index"], model=archive["model"]))
    for response, sent in ((client.post("/api/search", files={"image": ("my scan.png", b"not an image")}),
                            "my scan.png"),
                           (client.post("/api/query", json={"terms": [{"kind": "image", "data": "AAAA",
                                                                       "name": "mine.png"}]}), "mine.png"),
                           (client.get("/api/search", params={"q": "x", "under": "~/no-such-folder"}),
                            "~/no-such-folder")):
        error = response.json()["error"]
        assert response.status_code == 400 and sent in error, error
        assert "/tmp" not in error and "mi-serve-" not in error and str(Path.home()) not in error, error


# ------------------------------------------------------------------ 2. a slow PACS behind the thumbnails
class SlowPacs(BaseHTTPRequestHandler):
    release = threading.Event()

    def do_GET(self):  # noqa: N802
        SlowPacs.release.wait(25)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_slow_pacs_does_not_freeze_health_and_search(tmp_path, archive):
    pacs = ThreadingHTTPServer(("127.0.0.1", 0), SlowPacs)
    pacs.daemon_threads = True
    threading.Thread(target=pacs.serve_forever, daemon=True).start()
    index = copy_of(archive["index"], tmp_path)
    root = f"dicomweb+http://127.0.0.1:{pacs.server_address[1]}/dicom-web"
    with raw_db(index) as db:
        db.execute("UPDATE images SET path = ? || '/studies/1/series/2/instances/' || id", (root,))
        ids = [row[0] for row in db.execute("SELECT id FROM images")]
    served = start_server(index)
    try:
        with ThreadPoolExecutor(90) as pool:
            thumbnails = [pool.submit(ask, served.url, "GET", f"/api/images/{ids[i % len(ids)]}/thumbnail")
                          for i in range(90)]
            time.sleep(3)  # they have all been asked and wait on the PACS
            started = time.monotonic()
            health = ask(served.url, "GET", "/api/health")
            search = ask(served.url, "GET", "/api/search?q=chest&k=2")
            answered_in = time.monotonic() - started
            refused = [f.result() for f in thumbnails if f.done()]
            SlowPacs.release.set()
            statuses = [f.result()[0] for f in thumbnails]
        assert health[0] == 200 and search[0] == 200 and answered_in < 10, answered_in
        busy = [r for r in refused if r[0] == 503]
        assert busy and all(r[2].getheader("Retry-After") for r in busy)  # over the queue: 503 at once
        assert set(statuses) <= {400, 503} and 400 in statuses  # the PACS's 404: one line each
    finally:
        SlowPacs.release.set()
        stop_server(served.process)
        pacs.shutdown()


# ------------------------------------------------------------------ 6. the thumbnail cache
def test_thumbnails_follow_the_index_not_the_id(tmp_path, archive):
    import indexer

    data, index = tmp_path / "data", tmp_path / "index"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(data / f"a{i}.png")
    indexer.index_paths([data], index, model=archive["model"], workers=0)
    client = TestClient(create_app(index, model=archive["model"]))
    before = {i: client.get(f"/api/images/{i}/thumbnail").content for i in (1, 2, 3)}
    for path in index.iterdir():  # rebuilt: a new database in the same folder, the thumbnails left
        if path.name != "thumbnails":
            path.unlink()
    shutil.rmtree(data)
    data.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(data / f"b{i}.png")
    indexer.index_paths([data], index, model=archive["model"], workers=0)
    client = TestClient(create_app(index, model=archive["model"]))
    after = {i: client.get(f"/api/images/{i}/thumbnail").content for i in (1, 2, 3)}
    assert all(after[i] != before[i] for i in after)
    leftovers = list((index / "thumbnails").iterdir())
    assert len(leftovers) == 3  # the old index's thumbnails are gone


def test_simultaneous_first_requests_all_get_the_whole_picture(served, archive):
    folder = archive["index"] / "thumbnails"
    with ThreadPoolExecutor(16) as pool:
        for _round in range(8):
            shutil.rmtree(folder, ignore_errors=True)
            answers = list(pool.map(lambda _: ask(served.url, "GET", "/api/images/1/thumbnail"), range(16)))
            assert {status for status, _, _ in answers} == {200}
            assert len({body for _, body, _ in answers}) == 1 and answers[0][1].startswith(b"\x89PNG")


# ------------------------------------------------------------------ 8. a wrong model, and unexpected errors
def test_a_wrong_model_is_one_line_at_start_up(archive, tmp_path):
    index = copy_of(archive["index"], tmp_path)
    result = subprocess.run([sys.executable, "-c", "from retrieval.serve_cli import main; main()", "--index",
                             str(index), "--model", str(tmp_path / "no-such-model"), "--port", "0"],
                            env=command_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr


def test_an_unexpected_error_is_one_line_of_json(archive):
    app = create_app(archive["index"], model=archive["model"])

    def broken():
        raise RuntimeError("disk on fire\nat /srv/secret")

    app.state.searcher = broken
    response = TestClient(app, raise_server_exceptions=False).get("/api/search", params={"q": "x"})
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    assert "RuntimeError" in response.json()["error"] and "/srv/secret" not in response.text


# ------------------------------------------------------------------ 9. one server per index
def test_a_second_server_on_the_index_refuses_to_start(archive, tmp_path):
    index = copy_of(archive["index"], tmp_path)
    first = start_server(index)
    try:
        announced = json.loads((index / "server.json").read_text())
        result = subprocess.run([sys.executable, "-c", "from retrieval.serve_cli import main; main()", "--index",
                                 str(index), "--model", str(FIXTURE), "--port", "0"],
                                env=command_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"pid {first.process.pid}" in result.stderr and first.url in result.stderr
        assert json.loads((index / "server.json").read_text()) == announced
    finally:
        stop_server(first.process)
    assert not (index / "server.json").exists()
    stale = {"url": "http://127.0.0.1:9", "pid": first.process.pid, "host": socket.gethostname(), "token": None}
    (index / "server.json").write_text(json.dumps(stale))  # a killed server's
    second = start_server(index)
    try:
        assert json.loads((index / "server.json").read_text())["pid"] == second.process.pid
    finally:
        stop_server(second.process)


# ------------------------------------------------------------------ 11. /docs offline
def test_the_docs_work_offline(served):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("no Chromium at /usr/bin/chromium")
    outside: list[str] = []

    def only_loopback(route):
        host = urllib.parse.urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost") or route.request.url.startswith("data:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            page.route("**/*", only_loopback)
            page.goto(f"{served.url}/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            operations = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
        finally:
            browser.close()
    assert any("/api/search" in op for op in operations) and outside == [], (operations, outside)
