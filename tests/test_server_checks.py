"""The dataset checks served by mi-serve: /api/duplicates, /api/leakage and /api/outliers answer what
`mi duplicates / leakage / outliers --json` print for the same parameters, /api/map/points and
/api/map/colours decode to the stored map and the index's fields, bad parameters are one-line 422s, a
token is required when set, reports are cached per generation, and no planted identifier is served."""
from __future__ import annotations

import base64
import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.commands import mi
from retrieval.curate.imagemap import load_map, map_files
from servers import FIXTURE, PYDICOM_FILES, start_server, stop_server
from test_curate_leakage import PLANTED_ID, PLANTED_NAME, write_dicom

TOKEN = "checks-token-4711"
PLANTED = (PLANTED_ID, PLANTED_NAME.split("^")[0], "19491231")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """train/ and test/ folders: the planted patient in both, a file copied from train to test (an exact
    duplicate across the splits), other patients apart, and two pydicom files; indexed with the tiny model,
    with a PCA map; a mi-serve with a token over it."""
    import indexer
    from encoders import load_model
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("checks").resolve()
    for split in ("train", "test"):
        (root / "data" / split).mkdir(parents=True)
    write_dicom(root / "data" / "train" / "a.dcm", PLANTED_ID, generate_uid(), 1)
    write_dicom(root / "data" / "test" / "b.dcm", PLANTED_ID, generate_uid(), 2)
    write_dicom(root / "data" / "train" / "c.dcm", "P-OTHER-1", generate_uid(), 3)
    write_dicom(root / "data" / "test" / "d.dcm", "P-OTHER-2", generate_uid(), 4)
    shutil.copy(root / "data" / "train" / "c.dcm", root / "data" / "test" / "c_copy.dcm")
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", root / "data" / "train")
    shutil.copy(PYDICOM_FILES / "MR_small.dcm", root / "data" / "test")
    index = root / "index"
    indexer.index_paths([root / "data"], index, model=load_model(FIXTURE, device="cpu"), workers=0)
    assert cli("map", "--index", str(index), "--method", "pca")["points"] == 7
    served = start_server(index, "--token", TOKEN)
    yield {"root": root, "index": index, "url": served.url, "bodies": []}
    stop_server(served.process)


def cli(*args: str) -> dict:
    result = CliRunner().invoke(mi, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.output)


def get(archive, path: str, params: list[tuple[str, str]] | None = None, token: str | None = TOKEN):
    """(status, headers, body bytes) of a GET; every body is kept for the PHI check."""
    url = archive["url"] + path + ("?" + urllib.parse.urlencode(params) if params else "")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, body = error.code, error.headers, error.read()
    archive["bodies"].append(body)
    return status, headers, body


def get_json(archive, path, params=None):
    status, _, body = get(archive, path, params)
    assert status == 200, body
    return json.loads(body)


def test_duplicates_answer_what_mi_duplicates_prints(archive):
    index = str(archive["index"])
    served = get_json(archive, "/api/duplicates", [("threshold", "0.97")])
    assert served == cli("duplicates", "--index", index, "--threshold", "0.97")
    exact = [c for c in served["clusters"] if c["kind"] == "exact"]
    assert any({Path(m["path"]).name for m in c["members"]} == {"c.dcm", "c_copy.dcm"} for c in exact)
    assert served["nearest_similarity"]["histogram"]
    only_exact = get_json(archive, "/api/duplicates", [("near", "false")])
    assert only_exact == cli("duplicates", "--index", index, "--exact-only")
    limited = get_json(archive, "/api/duplicates", [("near", "false"), ("limit", "0")])
    assert limited["clusters"] == [] and limited["summary"] == only_exact["summary"]


def test_leakage_by_stored_folders_and_by_field_answers_what_mi_leakage_prints(archive):
    index, data = str(archive["index"]), archive["root"] / "data"
    splits = [("split", f"train={data / 'train'}"), ("split", f"test={data / 'test'}")]
    served = get_json(archive, "/api/leakage", splits + [("threshold", "0.97")])
    assert served == cli("leakage", "--index", index, "--split", f"train={data / 'train'}",
                         "--split", f"test={data / 'test'}", "--threshold", "0.97")
    (pair,) = served["pairs"]
    assert served["leakage"] and pair["patients"]["count"] == 2 and pair["exact_duplicates"]["count"] == 1
    by_modality = get_json(archive, "/api/leakage", [("by", "modality"), ("near", "false")])
    assert by_modality == cli("leakage", "--index", index, "--split-by", "modality", "--no-near")
    # a folder is matched against the stored paths only: one that exists on disk but holds no indexed file is empty
    elsewhere = get_json(archive, "/api/leakage", [("split", f"train={data / 'train'}"),
                                                    ("split", f"other={archive['index']}"), ("near", "false")])
    assert elsewhere["splits"]["other"] == 0 and not elsewhere["leakage"]


def test_outliers_answer_what_mi_outliers_prints(archive):
    index = str(archive["index"])
    assert get_json(archive, "/api/outliers") == cli("outliers", "--index", index, "--top", "50")
    assert get_json(archive, "/api/outliers", [("by", "folder"), ("top", "3")]) == \
        cli("outliers", "--index", index, "--by", "folder", "--top", "3")


def test_the_map_points_and_colours_decode_to_the_stored_map_and_fields(archive):
    from retrieval.curate.reader import IndexReader

    ids, xy = load_map(archive["index"])
    summary = get_json(archive, "/api/map")
    assert summary["count"] == len(ids) == 7 and summary["method"] == "pca"
    assert summary["generation"] == map_files(archive["index"])[-1][0]
    assert summary["fields"] == ["modality", "body_part", "view", "folder"]
    status, headers, body = get(archive, "/api/map/points")
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    n = int(headers["X-Map-Count"])
    assert n == len(ids) and len(body) == 12 * n
    assert np.array_equal(np.frombuffer(body[:4 * n], "<i4"), ids)
    assert np.array_equal(np.frombuffer(body[4 * n:], "<f4").reshape(n, 2), xy)
    with IndexReader(archive["index"]) as reader:
        stored = reader.columns(["modality", "path"])
    assert np.array_equal(stored["id"], ids)
    for by, expected in (("modality", stored["modality"]),
                         ("folder", [str(Path(p).parent) for p in stored["path"]])):
        colours = get_json(archive, "/api/map/colours", [("by", by)])
        codes = np.frombuffer(base64.b64decode(colours["codes"]), "<u2")
        assert colours["by"] == by and len(codes) == n
        assert [colours["values"][c] for c in codes] == expected
        counts = [int((codes == c).sum()) for c in range(len(colours["values"]))]
        assert counts == sorted(counts, reverse=True) and min(counts) > 0  # most frequent first


def test_without_a_map_the_map_is_a_one_line_404(archive):
    (_, path), = map_files(archive["index"])
    moved = path.with_name("moved-away.npz")
    path.rename(moved)
    try:
        for route in ("/api/map", "/api/map/points", "/api/map/colours?by=view"):
            status, _, body = get(archive, route)
            assert (status, json.loads(body)) == (404, {"error": "no map yet: run mi map"})
    finally:
        moved.rename(path)
    assert get_json(archive, "/api/map")["count"] == 7


@pytest.mark.parametrize("route, params", [
    ("/api/duplicates", [("threshold", "1.5")]), ("/api/duplicates", [("limit", "5001")]),
    ("/api/duplicates", [("threshhold", "0.9")]), ("/api/outliers", [("top", "1001")]),
    ("/api/outliers", [("by", "colour")]), ("/api/leakage", []), ("/api/leakage", [("split", "train=/data")]),
    ("/api/leakage", [("by", "modality"), ("split", "a=/x"), ("split", "b=/y")]),
    ("/api/leakage", [("split", "a=data/train"), ("split", "b=/y")]),
    ("/api/leakage", [("by", "patient_name")]), ("/api/leakage", [("by", "modality"), ("threshold", "-0.1")]),
    ("/api/map/colours", [("by", "patient")]), ("/api/map/colours", [])])
def test_bad_parameters_are_a_one_line_422(archive, route, params):
    status, _, body = get(archive, route, params)
    answer = json.loads(body)
    assert status == 422, answer
    assert set(answer) == {"error"} and "\n" not in answer["error"] and answer["error"]


def test_a_token_is_required(archive):
    for route in ("/api/duplicates", "/api/leakage?by=modality", "/api/outliers", "/api/map", "/api/map/points"):
        status, _, _ = get(archive, route, token=None)
        assert status == 401
        assert get(archive, route, token="wrong")[0] == 401


def test_a_second_identical_request_is_answered_from_the_cache(archive, monkeypatch):
    from fastapi.testclient import TestClient

    from retrieval.curate import outliers as outlier_check
    from retrieval.server.app import create_app

    calls = []
    real = outlier_check.find_outliers
    monkeypatch.setattr(outlier_check, "find_outliers", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    client = TestClient(create_app(archive["index"], model=FIXTURE))
    first = client.get("/api/outliers", params={"top": 4})
    assert client.get("/api/outliers", params={"top": 4}).json() == first.json()
    assert len(calls) == 1
    assert client.get("/api/outliers", params={"top": 5}).status_code == 200 and len(calls) == 2


def test_no_planted_identifier_in_any_answer(archive):
    data = archive["root"] / "data"
    for route, params in (("/api/duplicates", [("threshold", "0.5")]), ("/api/outliers", [("by", "modality")]),
                          ("/api/leakage", [("by", "patient_hash")]),
                          ("/api/leakage", [("split", f"train={data / 'train'}"), ("split", f"test={data / 'test'}")]),
                          ("/api/map", None), ("/api/map/points", None)):
        assert get(archive, route, params)[0] == 200
    for by in ("modality", "body_part", "view", "folder"):
        assert get(archive, "/api/map/colours", [("by", by)])[0] == 200
    for body in archive["bodies"]:  # these, and every answer of the tests above
        for identifier in PLANTED:
            assert identifier.encode() not in body


def test_an_image_removed_since_the_map_is_dropped_from_its_points_and_colours(archive):
    """(Last: it changes the module's index.)"""
    import indexer
    from encoders import load_model

    ids, _ = load_map(archive["index"])
    gone = archive["root"] / "data" / "test" / "d.dcm"
    id_of = {Path(o["path"]).name: o["id"] for o in get_json(archive, "/api/outliers", [("top", "7")])["outliers"]}
    gone.unlink()
    indexer.index_paths([archive["root"] / "data"], archive["index"], model=load_model(FIXTURE, device="cpu"),
                        workers=0)
    summary = get_json(archive, "/api/map")
    assert summary["count"] == 6 and summary["index_generation"] > summary["generation"]
    status, headers, body = get(archive, "/api/map/points")
    served = np.frombuffer(body[:24], "<i4")
    assert list(served) == [i for i in ids if i != id_of["d.dcm"]]
    codes = np.frombuffer(base64.b64decode(get_json(archive, "/api/map/colours", [("by", "folder")])["codes"]), "<u2")
    assert len(codes) == 6
