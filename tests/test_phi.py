"""Privacy of the index beyond its fields: one pseudonym per patient across the schema-3
migration, a search that never makes or mixes patient keys, owner-only index files, and a
server that never echoes a token it was given."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

import indexer
from encoders import load_model
from indexer.store import IndexStore

from raw_sqlite import fetch_rows

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu")


def _mi_search(*args, env=None):
    from retrieval.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], env={"MI_MODEL": None, "MI_INDEX": None, **(env or {})})


def test_a_migrated_image_and_a_new_image_of_one_patient_share_a_pseudonym(tmp_path, model):
    from sqlalchemy import create_engine, text

    from indexer.store import schema as schema_module
    from indexer.legacy_pseudonyms import legacy_hash
    from retrieval import Searcher

    ct = PYDICOM_FILES / "CT_small.dcm"
    patient_id = str(pydicom.dcmread(ct, stop_before_pixels=True).PatientID)
    index_dir = tmp_path / "old"
    index_dir.mkdir()
    engine = create_engine(f"sqlite:///{index_dir / 'index.sqlite'}")
    with engine.begin() as conn:  # an index as version 1 of the schema wrote it: a salted hash per image
        schema_module._m001_initial(conn)
        conn.execute(text("INSERT INTO meta VALUES ('schema_version', '1')"))
        salt = conn.execute(text("SELECT value FROM meta WHERE key = 'patient_salt'")).scalar()
        vector = np.zeros(model.dim, np.float32)
        vector[0] = 1
        conn.execute(text("INSERT INTO files VALUES ('/archive/old.dcm', 1, 1, 'old', NULL, 'now')"))
        conn.execute(text("INSERT INTO images (path, frame, content_hash, patient_hash, embedding) "
                          "VALUES ('/archive/old.dcm', 0, 'old', :h, :e)"),
                     {"h": legacy_hash(patient_id, salt), "e": vector.tobytes()})
    engine.dispose()
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ct, data / "new.dcm")
    indexer.index_paths([data], index_dir, model=model, workers=0)  # migrates, then adds the new image
    pseudonyms = dict(fetch_rows(index_dir, "SELECT path, patient_hash FROM images"))
    assert len(pseudonyms) == 2 and None not in pseudonyms.values()
    assert pseudonyms["/archive/old.dcm"] == pseudonyms[str((data / "new.dcm").resolve())]
    meta = dict(fetch_rows(index_dir, "SELECT key, value FROM meta"))
    assert "patient_salt" not in meta and salt not in " ".join(meta.values())   # kept sealed only
    # the query (not indexed: a changed copy) excludes both images of its patient, the migrated one too
    query = tmp_path / "query.dcm"
    query.write_bytes(ct.read_bytes() + b"\0\0")
    with Searcher(index_dir, model=model) as searcher:
        hits = searcher.search(image=str(query), k=5, exclude_same="patient")
    assert hits == []


def test_a_search_with_another_or_no_patient_key_refuses_and_makes_none(tmp_path, model, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", data)
    shutil.copy(PYDICOM_FILES / "MR_small.dcm", data)
    index_dir = tmp_path / "index"
    indexer.index_paths([data], index_dir, model=model, workers=0)
    query = tmp_path / "query.dcm"
    query.write_bytes((PYDICOM_FILES / "CT_small.dcm").read_bytes() + b"\0\0")   # not indexed: decoded
    args = ["--image", query, "--index", index_dir, "--model", FIXTURE, "--exclude-same-patient", "--json"]

    missing = tmp_path / "nowhere" / "patient.key"
    monkeypatch.setenv("MI_PATIENT_KEY_FILE", str(missing))
    result = _mi_search(*args)
    assert result.exit_code != 0 and not missing.exists()
    assert "patient key" in result.output and len(result.output.strip().splitlines()) == 1, result.output

    other = tmp_path / "other.key"
    other.write_text("fedcba9876543210" * 4)
    monkeypatch.setenv("MI_PATIENT_KEY_FILE", str(other))
    result = _mi_search(*args)
    assert result.exit_code != 0 and "another key" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_index_folder_and_the_thumbnails_are_the_owners_only(tmp_path, model):
    from fastapi.testclient import TestClient

    from retrieval.server import create_app

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", data)
    index_dir = tmp_path / "new" / "index"
    previous = os.umask(0o022)                            # the usual umask: world-readable by default
    try:
        indexer.index_paths([data], index_dir, model=model, workers=0)
        with IndexStore.open(index_dir) as store:         # a writer open: -wal and -shm exist meanwhile
            sidecars = [index_dir / "index.sqlite-wal", index_dir / "index.sqlite-shm"]
            assert all(path.exists() for path in sidecars)
            assert {path.name: _mode(path) for path in sidecars} == {path.name: 0o600 for path in sidecars}
        client = TestClient(create_app(index_dir, model=model))
        (hit,) = client.get("/api/search", params={"q": "x", "k": 1}).json()
        assert client.get(f"/api/images/{hit['id']}/thumbnail").status_code == 200
    finally:
        os.umask(previous)
    assert _mode(index_dir) == 0o700
    files = [path for path in index_dir.rglob("*") if path.is_file()]
    assert any(path.name.startswith("vectors.") for path in files) and (index_dir / "index.sqlite") in files
    assert any(path.parent.name == "thumbnails" for path in files)
    assert {str(path): _mode(path) for path in files} == {str(path): 0o600 for path in files}
    assert _mode(index_dir / "thumbnails") == 0o700


def test_mi_serve_never_echoes_a_token_it_was_given(tmp_path):
    from servers import command_env, start_server, stop_server

    index = tmp_path / "index"
    index.mkdir()
    token = "given-token-Q7x9Zk2"
    served = start_server(index, env=command_env(MI_SERVER_TOKEN=token))
    stop_server(served.process)
    output = served.announced
    assert "serving" in output, output
    assert token not in output and "token" in output      # it says a token is needed, not which
