"""Study-aware results: exact duplicates collapsed, one hit per study or patient, the query's own
study or patient left out, and a "no match" that says what the index holds."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

import indexer
from encoders import load_model
from retrieval import QueryError, Searcher

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
CT = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def variant(target: Path, study: str, patient: str, sop: str, shift: int = 0) -> Path:
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID, ds.PatientID, ds.SOPInstanceUID = study, patient, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    if shift:
        pixels = ds.pixel_array.astype(np.int32)
        ds.PixelData = np.roll(pixels, shift, axis=1).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(target)
    return target


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    data = root / "data"
    data.mkdir()
    files = {
        "a1": variant(data / "a1.dcm", "1.2.3.1", "P1", "1.2.3.1.1"),
        "a3": variant(data / "a3.dcm", "1.2.3.1", "P1", "1.2.3.1.3", shift=3),
        "b1": variant(data / "b1.dcm", "1.2.3.2", "P1", "1.2.3.2.1", shift=6),
        "c1": variant(data / "c1.dcm", "1.2.3.3", "P2", "1.2.3.3.1", shift=9),
    }
    files["a2"] = data / "a2-copy.dcm"
    shutil.copy(files["a1"], files["a2"])  # the same file twice
    model = load_model(FIXTURE, device="cpu")
    indexer.index_paths([data], root / "index", model=model, workers=0)
    return {"index": root / "index", "model": model, **files}


def names(hits) -> list[str]:
    return [Path(hit.path).stem.split("-")[0] for hit in hits]


def test_exact_duplicates_are_one_hit_unless_asked(archive):
    with Searcher(archive["index"], model=archive["model"]) as searcher:
        hits = searcher.search(image=archive["a1"], k=10)
        assert len(hits) == 4 and hits[0].copies == 2 and names(hits)[0] in ("a1", "a2")
        every = searcher.search(image=archive["a1"], k=10, duplicates=True)
        assert len(every) == 5 and all(hit.copies == 1 for hit in every)


def test_one_hit_per_study_or_patient(archive):
    with Searcher(archive["index"], model=archive["model"]) as searcher:
        by_study = searcher.search(image=archive["a1"], k=10, group="study")
        assert len(by_study) == 3 and by_study[0].in_group == 2  # a1 (+ its copy) and a3
        assert {hit.metadata["study_instance_uid"] for hit in by_study} == {"1.2.3.1", "1.2.3.2", "1.2.3.3"}
        by_patient = searcher.search(image=archive["a1"], k=10, group="patient")
        assert len(by_patient) == 2 and sorted(hit.in_group for hit in by_patient) == [1, 3]


def test_the_query_s_own_study_or_patient_can_be_left_out(archive):
    with Searcher(archive["index"], model=archive["model"]) as searcher:
        assert sorted(names(searcher.search(image=archive["a1"], k=10, exclude_same="study"))) == ["b1", "c1"]
        assert names(searcher.search(image=archive["a1"], k=10, exclude_same="patient")) == ["c1"]
        with pytest.raises(QueryError, match="needs an image query"):
            searcher.search("a text", exclude_same="study")


def test_no_match_names_what_the_index_holds(archive):
    from retrieval.cli import main as mi_search

    result = CliRunner().invoke(mi_search, ["x", "--index", str(archive["index"]), "--modality", "XX"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no image in the index matches modality XX" in result.output and "CT (5)" in result.output


def test_cli_group_and_exclude_options(archive):
    import json

    from retrieval.cli import main as mi_search

    common = [str(archive["a1"]), "--index", str(archive["index"]), "--json"]
    grouped = json.loads(CliRunner().invoke(mi_search, [*common, "--group", "study"]).output)
    assert len(grouped) == 3 and grouped[0]["in_group"] == 2
    others = json.loads(CliRunner().invoke(mi_search, [*common, "--exclude-same-patient"]).output)
    assert [Path(hit["path"]).name for hit in others] == ["c1.dcm"]
    every = json.loads(CliRunner().invoke(mi_search, [*common, "--show-duplicates"]).output)
    assert len(every) == 5


def test_the_table_fits_80_columns_and_keeps_every_column(archive, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from retrieval.cli import _print_table

    with Searcher(archive["index"], model=archive["model"]) as searcher:
        hits = searcher.search(image=archive["a1"], k=10, labels="normal,pneumothorax")
    archive["c1"].rename(archive["c1"].with_suffix(".gone"))  # a hit whose file is gone
    try:
        hits = [hit.__class__(**{**hit.__dict__, "missing": not Path(hit.path).exists()}) for hit in hits]
        buffer = io.StringIO()
        monkeypatch.chdir(archive["index"].parent)  # paths shown relative to here
        _print_table(hits, Console(file=buffer, width=80, color_system=None))
    finally:
        archive["c1"].with_suffix(".gone").rename(archive["c1"])
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    header = lines[0]
    for title in ("#", "score", "modality", "date", "study", "labels"):
        assert title in header
    text = buffer.getvalue()
    first = os.path.relpath(hits[0].path)  # the first hit's path, relative to here, as the table shows it
    assert first.startswith("data/") and first in text.replace("\n", "")
    words = re.findall(r"[\w.-]+", text)  # lines wrap, never cut: every word is there
    assert "copies" in words and "missing" in words and "2004-01-19" in words and "pneumothorax" in words
