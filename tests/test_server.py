"""mi-serve: the JSON API over a small index of real DICOM and PNG files (tiny fixture model),
its safety rules, and a real server process on a loopback port."""
from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.server import create_app, is_loopback

from servers import start_server, stop_server


@pytest.fixture(scope="module")
def client(archive):
    return TestClient(create_app(archive["index"], model=archive["model"]))


def test_health_search_and_filters(client, archive):
    health = client.get("/api/health").json()
    assert health["ready"] and health["images"] == 7 and health["model"]["dim"] == archive["model"].dim
    assert health["modalities"] == {"": 4, "CT": 1, "MR": 2} and health["last_indexed"].startswith("20")
    hits = client.get("/api/search", params={"q": "chest x-ray", "k": 5}).json()
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4, 5] and all(-1 <= hit["score"] <= 1 for hit in hits)
    mr = client.get("/api/search", params={"q": "x", "modality": "mr"}).json()
    assert {hit["modality"] for hit in mr} == {"MR"} and len(mr) == 2


def test_an_uploaded_image_finds_itself_first_and_more_like_this(client, archive):
    png = (archive["data"] / "png2.png").read_bytes()
    hits = client.post("/api/search", files={"image": ("query.png", png, "image/png")}, data={"k": "3"}).json()
    assert Path(hits[0]["path"]).name == "png2.png" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    dicom = (archive["data"] / "CT_small.dcm").read_bytes()
    hits = client.post("/api/search", files={"image": ("q.dcm", dicom, "application/dicom")}).json()
    assert Path(hits[0]["path"]).name == "CT_small.dcm"
    like = client.get("/api/search", params={"like": hits[0]["id"], "k": 2}).json()
    assert like[0]["id"] == hits[0]["id"]


def test_image_fields_and_thumbnails(client, archive):
    hits = client.get("/api/search", params={"q": "x", "modality": "CT"}).json()
    image_id = hits[0]["id"]
    fields = client.get(f"/api/images/{image_id}").json()
    assert fields["modality"] == "CT" and Path(fields["path"]).name == "CT_small.dcm"
    response = client.get(f"/api/images/{image_id}/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(response.content))
    assert max(thumb.size) <= 256 and response.content != (archive["data"] / "CT_small.dcm").read_bytes()
    assert len(list((archive["index"] / "thumbnails").glob(f"*-{fields['content_hash']}-0.png"))) == 1  # cached
    assert client.get("/api/images/999999").status_code == 400
    assert client.get("/api/images/999999/thumbnail").json()["error"].startswith("no image with id")


def test_bad_requests_get_a_one_line_4xx(client, archive):
    for params in ({"q": "x", "since": "last week"}, {}, {"q": "x", "group": "hospital"}):
        response = client.get("/api/search", params=params)
        assert 400 <= response.status_code < 500, params
        assert "\n" not in json.dumps(response.json()) and "Traceback" not in response.text
    not_an_image = client.post("/api/search", files={"image": ("x.png", b"not an image", "image/png")})
    assert not_an_image.status_code == 400 and "cannot read the query image" in not_an_image.json()["error"]


def test_a_path_in_a_text_query_is_never_read(client, archive):
    secret = archive["data"] / "png1.png"
    hits = client.get("/api/search", params={"q": str(secret), "k": 1}).json()  # a text, not an image query
    upload = client.post("/api/search", files={"image": ("q.png", secret.read_bytes(), "image/png")},
                         data={"k": "1"}).json()
    assert hits[0]["score"] < 0.99 and upload[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_a_token_is_required_when_set(archive):
    guarded = TestClient(create_app(archive["index"], model=archive["model"], token="s3cret"))
    assert guarded.get("/api/health").status_code == 401
    assert guarded.get("/api/health", headers={"Authorization": "Bearer s3cret"}).json()["ready"]
    assert guarded.get("/api/health", params={"token": "s3cret"}).json()["ready"]
    assert guarded.get("/").status_code == 200  # the page itself holds nothing; it sends the token


def test_starts_on_a_missing_index_and_says_so(tmp_path, archive):
    empty = TestClient(create_app(tmp_path / "nothing-here", model=archive["model"]))
    health = empty.get("/api/health").json()
    assert health["ready"] is False and "no index" in health["reason"]
    assert empty.get("/api/search", params={"q": "x"}).status_code == 400


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")


def test_a_real_server_process_serves_the_page_and_the_api(archive):
    served = start_server(archive["index"])
    try:
        with urllib.request.urlopen(f"{served.url}/api/health", timeout=30) as response:
            health = json.load(response)
        assert health["ready"] and health["images"] == 7
        with urllib.request.urlopen(f"{served.url}/", timeout=5) as response:
            assert b"Medical image search" in response.read()
        with urllib.request.urlopen(f"{served.url}/api/search?q=chest&k=2", timeout=30) as response:
            assert len(json.load(response)) == 2
    finally:
        stop_server(served.process)
