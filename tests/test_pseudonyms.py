"""Patient pseudonyms: keyed with a key outside the index, and salted hashes migrated to them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

import indexer
from encoders import load_model
from indexer.store import IndexStore

from cli_checks import one_line_failure
from raw_sqlite import fetch_rows

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu")


def test_patient_pseudonyms_are_keyed_with_a_key_outside_the_index(tmp_path, model, monkeypatch):
    from click.testing import CliRunner

    from indexer.cli import main as mi_index
    from indexer.privacy import pseudonym

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", data)
    key_file = tmp_path / "team.key"
    key_file.write_text("0123456789abcdef" * 4)
    monkeypatch.setenv("MI_PATIENT_KEY_FILE", str(key_file))
    index_dir = tmp_path / "index"
    indexer.index_paths([data], index_dir, model=model, workers=0)
    meta = dict(fetch_rows(index_dir, "SELECT key, value FROM meta"))
    assert "patient_salt" not in meta
    patient_id = str(pydicom.dcmread(data / "CT_small.dcm", stop_before_pixels=True).PatientID)
    ((stored,), *_) = fetch_rows(index_dir, "SELECT patient_hash FROM images")
    assert stored == pseudonym(patient_id, key_file.read_bytes().strip())
    assert key_file.read_bytes().strip() not in (index_dir / "index.sqlite").read_bytes()

    other = tmp_path / "other.key"
    other.write_text("fedcba9876543210" * 4)
    monkeypatch.setenv("MI_PATIENT_KEY_FILE", str(other))
    (data / "copy.dcm").write_bytes((data / "CT_small.dcm").read_bytes() + b"\0\0")
    message = one_line_failure(CliRunner().invoke(mi_index, [str(data), "--index", str(index_dir), "--model",
                                                            str(FIXTURE), "--workers", "0"]))
    assert "another key" in message and "MI_PATIENT_KEY_FILE" in message


def test_an_index_with_salted_hashes_is_migrated_to_keyed_pseudonyms(tmp_path):
    from sqlalchemy import create_engine, text

    from indexer.store import schema as schema_module
    from indexer.store import database as store_module
    from indexer.privacy import patient_key, pseudonym

    index_dir = tmp_path / "old"
    index_dir.mkdir()
    engine = create_engine(f"sqlite:///{index_dir / 'index.sqlite'}")
    with engine.begin() as conn:  # an index as version 1 of the schema wrote it
        schema_module._m001_initial(conn)
        conn.execute(text("INSERT INTO meta VALUES ('schema_version', '1')"))
        conn.execute(text("INSERT INTO files VALUES ('/a.dcm', 1, 1, 'h', NULL, 'now')"))
        conn.execute(text("INSERT INTO images (path, frame, content_hash, patient_hash, embedding) "
                          "VALUES ('/a.dcm', 0, 'h', 'salted-hash-of-patient-1', x'0000803f')"))
    engine.dispose()
    with IndexStore.open(index_dir, create=True) as store:
        assert store.rows([1])[1]["patient_hash"] == pseudonym("salted-hash-of-patient-1", patient_key())
    meta = dict(fetch_rows(index_dir, "SELECT key, value FROM meta"))
    assert "patient_salt" not in meta and meta["schema_version"] == str(store_module.SCHEMA_VERSION)
