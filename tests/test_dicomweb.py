"""Indexing from a PACS over DICOMweb, against a real Orthanc: the PACS index equals the folder
index of the same files; re-runs pick up added and deleted instances; a server that dies mid-run
gives one clear line and a resumable index; wrong credentials give one line; 5xx answers are
retried and --connections bounds the retrievals in flight; a bearer token from the environment
goes with every request and nowhere else."""
from __future__ import annotations

import json
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

import indexer
from encoders import load_model
from indexer.cli import main as mi_index
from indexer.sources.dicomweb import DicomwebSource
from indexer.sources.pacs import QueryFilters
from indexer.pacs_keys import instance_uids, wado_url
from indexer.errors import SourceError
from orthanc_server import MISSING, Orthanc, dicom_files, rows, stocked

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
FIELDS = ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "modality", "body_part",
          "study_date", "width", "height", "source_format", "patient_sex", "patient_age", "patient_hash",
          "content_hash", "frame")


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu", towers=("image",))


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop()


def test_pacs_index_equals_folder_index_and_hits_point_back(tmp_path, model, orthanc):
    uploaded = stocked(orthanc, dicom_files(), tmp_path / "files")
    assert len(uploaded) >= 6
    # One image per model call: a batch's other images would move the last bits of a vector, and
    # the PACS lists the instances in another order than the folder's
    from_pacs = indexer.index_dicomweb(orthanc.url, tmp_path / "pacs", model=model, workers=1, batch_size=1)
    from_files = indexer.index_paths([tmp_path / "files"], tmp_path / "folder", model=model, workers=0, batch_size=1)
    assert from_pacs["new"] == from_files["new"] == len(uploaded)
    assert from_pacs["images"] == from_files["images"] > 0
    pacs, files = rows(tmp_path / "pacs"), rows(tmp_path / "folder")
    assert pacs.keys() == files.keys()
    for uid, row in pacs.items():
        for name in FIELDS:
            assert row[name] == files[uid][name], (uid, name)
        np.testing.assert_array_equal(row["embedding"],
                                      files[uid]["embedding"])
        assert instance_uids(row["path"]) == (row["study_instance_uid"], row["series_instance_uid"], uid)

    from retrieval import Searcher
    with Searcher(tmp_path / "pacs", model=model) as searcher:
        some = next(iter(files.values()))
        (hit,) = searcher.search(str(some["path"]), k=1)
    found = hit.to_dict()
    assert found["sop_instance_uid"] == some["sop_instance_uid"]
    assert found["study_instance_uid"] and found["series_instance_uid"]
    assert found["wado_rs_url"] == wado_url(found["path"]) and found["wado_rs_url"].startswith(orthanc.root)
    assert not found["missing"]

    # mi-serve renders a PACS hit's thumbnail from the instance it retrieves: the file's thumbnail
    from retrieval.server import thumbnail_png
    with Searcher(tmp_path / "pacs", model=model) as searcher:
        from_server = thumbnail_png(searcher, tmp_path / "pacs", hit.id)
    with Searcher(tmp_path / "folder", model=model) as searcher:
        (same,) = searcher.search(str(some["path"]), k=1)
        assert same.metadata["sop_instance_uid"] == found["sop_instance_uid"]
        assert from_server == thumbnail_png(searcher, tmp_path / "folder", same.id)

    again = indexer.index_dicomweb(orthanc.url, tmp_path / "pacs", model=model, workers=0)
    assert (again["unchanged"], again["new"], again["encoded"], again["removed"]) == (len(uploaded), 0, 0, 0)


def test_filters_are_applied_by_the_server_and_sweep_only_what_they_cover(tmp_path, model, orthanc):
    ids = stocked(orthanc, dicom_files())
    modality = {path: pydicom.dcmread(path, stop_before_pixels=True).Modality for path in ids}
    wanted = max(set(modality.values()), key=list(modality.values()).count)
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ids if modality[p] == wanted}
    source = DicomwebSource(orthanc.url, QueryFilters(modalities=(wanted,)))
    assert {instance_uids(item.key)[2] for item in source.items()} == expected
    dated = DicomwebSource(orthanc.url, QueryFilters(study_date="19000101-19000102"))
    assert list(dated.items()) == []
    copy = pickle.loads(pickle.dumps(source))  # as a Ray task receives it: reads on its own session
    assert copy.read(next(copy.items()))[128:132] == b"DICM"
    with pytest.raises(SourceError, match="--study-date"):
        QueryFilters(study_date="2020-01-01")

    # A filtered re-run removes the deleted instances it covers, and only those
    indexer.index_dicomweb(orthanc.url, tmp_path / "index", model=model, workers=0)
    covered = next(path for path in ids if modality[path] == wanted)
    other = next(path for path in ids if modality[path] != wanted)
    orthanc.delete(ids[covered])
    orthanc.delete(ids[other])
    filtered = indexer.index_dicomweb(orthanc.url, tmp_path / "index", model=model, workers=0, modalities=[wanted])
    assert (filtered["removed"], filtered["unchanged"]) == (1, len(expected) - 1)
    assert str(pydicom.dcmread(other, stop_before_pixels=True).SOPInstanceUID) in rows(tmp_path / "index")
    unfiltered = indexer.index_dicomweb(orthanc.url, tmp_path / "index", model=model, workers=0)
    assert unfiltered["removed"] == 1 and len(rows(tmp_path / "index")) == len(ids) - 2


def test_rerun_picks_up_added_and_deleted_instances(tmp_path, model, orthanc):
    files = dicom_files()
    first, later = files[:4], files[4:6]
    ids = stocked(orthanc, first)
    summary = indexer.index_dicomweb(orthanc.url, tmp_path / "index", model=model, workers=0)
    assert summary["new"] == len(ids)
    gone = next(iter(ids))
    orthanc.delete(ids[gone])
    added = stocked(orthanc, later)
    # --update re-lists the PACS the index records
    result = CliRunner().invoke(mi_index, ["--update", "--index", str(tmp_path / "index"), "--workers", "0", "--json"],
                                env={"MI_MODEL": str(FIXTURE)})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["new"], summary["removed"], summary["unchanged"]) == (len(added), 1, len(ids) - 1)
    held = rows(tmp_path / "index")
    assert str(pydicom.dcmread(gone, stop_before_pixels=True).SOPInstanceUID) not in held
    for path in added:
        assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) in held

    result = CliRunner().invoke(mi_index, ["--remove", orthanc.url, "--index", str(tmp_path / "index")])
    assert result.exit_code == 0 and f"removed {len(held)} files" in result.output, result.output
    assert rows(tmp_path / "index") == {}


def test_server_killed_mid_run_gives_one_line_and_a_resumable_index(tmp_path, model, orthanc, monkeypatch):
    uploaded = stocked(orthanc, dicom_files())
    retrieve = DicomwebSource._retrieve
    calls = []

    def dies_on_the_fifth(self, item):
        calls.append(item.key)
        if len(calls) == 5:
            orthanc.stop(signal.SIGKILL)
        return retrieve(self, item)

    monkeypatch.setattr(DicomwebSource, "_retrieve", dies_on_the_fifth)
    result = CliRunner().invoke(mi_index, [orthanc.url, "--index", str(tmp_path / "index"), "--workers", "0",
                                           "--batch-size", "1", "--connections", "1"],
                                env={"MI_MODEL": str(FIXTURE)})
    assert result.exit_code == 1
    message = result.output.strip()
    assert "stopped answering" in message and "run mi-index again" in message, message
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    kept = rows(tmp_path / "index")
    assert 0 < len(kept) < len(uploaded)

    monkeypatch.setattr(DicomwebSource, "_retrieve", retrieve)
    orthanc.start()  # same storage, same port
    summary = indexer.index_dicomweb(orthanc.url, tmp_path / "index", model=model, workers=0)
    assert summary["unchanged"] == len(kept) and summary["new"] == len(uploaded) - len(kept)
    assert len(rows(tmp_path / "index")) == len(uploaded)


def test_credentials_are_checked_and_never_stored(tmp_path, model, monkeypatch):
    server = Orthanc(tmp_path / "orthanc", users={"alice": "s3cret-pass"}).start()
    try:
        stocked(server, dicom_files(2))
        result = CliRunner().invoke(mi_index, [server.url, "--index", str(tmp_path / "index"), "--user", "alice",
                                               "--password", "wrong"], env={"MI_MODEL": str(FIXTURE)})
        assert result.exit_code == 1
        message = result.output.strip()
        assert "refused the credentials" in message and len(message.splitlines()) == 1, message
        assert not (tmp_path / "index").exists()  # a failed first run leaves nothing behind

        result = CliRunner().invoke(mi_index, [server.url.replace("://", "://alice:s3cret-pass@"), "--index",
                                               str(tmp_path / "index")])
        assert result.exit_code != 0 and "not in the URL" in result.output

        monkeypatch.setenv("MI_DICOMWEB_USER", "alice")
        monkeypatch.setenv("MI_DICOMWEB_PASSWORD", "s3cret-pass")
        summary = indexer.index_dicomweb(server.url, tmp_path / "index", model=model, workers=0)
        assert summary["new"] == 2
        for path in (tmp_path / "index").iterdir():
            assert b"s3cret-pass" not in path.read_bytes() and b"alice" not in path.read_bytes()
    finally:
        server.stop()


class FlakyProxy:
    """In front of Orthanc: answers 503 to the first retrieval of each instance, and counts the
    retrievals in flight at once."""

    def __init__(self, target: str) -> None:
        import http.server
        import threading
        import urllib.request

        self.in_flight = self.most_in_flight = 0
        self.refused: set[str] = set()
        self.authorizations: set[str] = set()
        lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                proxy.authorizations.add(self.headers.get("Authorization", ""))
                retrieval = "/instances/" in self.path and "?" not in self.path
                if retrieval:
                    with lock:
                        first = self.path not in proxy.refused
                        proxy.refused.add(self.path)
                        proxy.in_flight += 1
                        proxy.most_in_flight = max(proxy.most_in_flight, proxy.in_flight)
                try:
                    if retrieval and first:
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    if retrieval:
                        time.sleep(0.05)  # a slower archive: retrievals overlap if nothing bounds them
                    request = urllib.request.Request(target + self.path, headers={
                        k: v for k, v in self.headers.items() if k.lower() == "accept"})
                    with urllib.request.urlopen(request) as answer:
                        body = answer.read()
                        self.send_response(answer.status)
                        self.send_header("Content-Type", answer.headers["Content-Type"])
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    if retrieval:
                        with lock:
                            proxy.in_flight -= 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"dicomweb+http://127.0.0.1:{self.server.server_address[1]}/dicom-web"


def test_5xx_answers_are_retried_and_connections_bound_retrievals(tmp_path, model, orthanc, monkeypatch):
    ids = stocked(orthanc, dicom_files())
    monkeypatch.setenv("MI_DICOMWEB_TOKEN", "t0ken-from-env")
    proxy = FlakyProxy(orthanc.root)
    try:
        summary = indexer.index_dicomweb(proxy.url, tmp_path / "index", model=model, workers=2, connections=2)
    finally:
        proxy.server.shutdown()
    assert (summary["new"], summary["skipped"]) == (len(ids), 0)  # every first answer was a 503
    assert len(proxy.refused) == len(ids)
    assert 1 <= proxy.most_in_flight <= 2
    assert proxy.authorizations == {"Bearer t0ken-from-env"}  # every request, listing and retrieval
    for path in (tmp_path / "index").iterdir():
        assert b"t0ken" not in path.read_bytes()
