"""mi leakage: patients (by pseudonym), studies and duplicates across splits; exit status 1 on
leakage, 0 when clean; no identifier beyond what the index stores in any output."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from curate_synthetic import near, unit, write_index
from made_images import planted_cr
from retrieval.commands import mi

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "medimageinsight-tiny"
PLANTED_NAME = "Leakington^Planted"
PLANTED_ID = "PID-93571-PLANTED"


def write_dicom(path: Path, patient_id: str, study: str, seed: int) -> None:
    """A small CR with a planted PatientName, PatientID and birth date."""
    planted_cr(path, patient_id, study=study, seed=seed, name=PLANTED_NAME if "PLANTED" in patient_id else "Other^One")


@pytest.fixture(scope="module")
def split_archive(tmp_path_factory):
    """train/ and test/ with one patient (planted ID) in both, in two studies; others apart."""
    import indexer
    from encoders import load_model
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("splits")
    for split in ("train", "test", "clean_test"):
        (root / split).mkdir()
    write_dicom(root / "train" / "a.dcm", PLANTED_ID, generate_uid(), 1)
    write_dicom(root / "test" / "b.dcm", PLANTED_ID, generate_uid(), 2)
    write_dicom(root / "train" / "c.dcm", "P-OTHER-1", generate_uid(), 3)
    write_dicom(root / "clean_test" / "d.dcm", "P-OTHER-2", generate_uid(), 4)
    indexer.index_paths([root], root / "index", model=load_model(FIXTURE, device="cpu"), workers=0)
    return root


def run(*args: str):
    return CliRunner().invoke(mi, ["leakage", *args], catch_exceptions=False)


def test_a_patient_in_two_split_folders_is_leakage_and_no_identifier_is_shown(split_archive, tmp_path):
    root = split_archive
    out = tmp_path / "leaks.csv"
    common = ["--index", str(root / "index"), "--split", f"train={root / 'train'}", "--split",
              f"test={root / 'test'}", "--no-near"]
    result = run(*common, "--json", "--csv", str(out))
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    (pair,) = report["pairs"]
    assert report["leakage"] and report["splits"] == {"train": 2, "test": 1}
    assert pair["patients"]["count"] == 1 and pair["studies"]["count"] == 0
    assert len(pair["patients"]["items"][0]["patient"]) == 32  # the pseudonym, never the ID
    table = run(*common)
    assert table.exit_code == 1 and "LEAKAGE" in table.output and "1 patients in both" in table.output
    rows = list(csv.DictReader(out.open()))
    assert {(r["check"], Path(r["path"]).name, r["split"]) for r in rows} == {
        ("patients", "a.dcm", "train"), ("patients", "b.dcm", "test")}
    for text in (result.output, table.output, out.read_text()):
        assert PLANTED_ID not in text and "Leakington" not in text and "19491231" not in text


def test_clean_splits_exit_0(split_archive):
    root = split_archive
    result = run("--index", str(root / "index"), "--split", f"train={root / 'train'}", "--split",
                 f"test={root / 'clean_test'}", "--no-near")
    assert result.exit_code == 0, result.output
    assert "clean" in result.output and "LEAKAGE" not in result.output


def test_splits_from_a_csv_of_uids_with_near_and_exact_duplicates_across(tmp_path):
    rng = np.random.default_rng(5)
    base = unit(rng.standard_normal((40, 32)))
    images = [{"path": f"/x/{i}.dcm", "embedding": base[i], "sop_instance_uid": f"2.{i}", "study_instance_uid": f"3.{i}",
               "patient_hash": f"{i:032x}"} for i in range(40)]
    images.append({"path": "/x/near.dcm", "embedding": near(base[0], 0.995, rng), "sop_instance_uid": "2.near",
                   "study_instance_uid": "3.near", "patient_hash": "f" * 32})
    images.append({**images[5], "path": "/x/resent.dcm", "embedding": base[5]})  # same SOP UID as 2.5
    write_index(tmp_path / "index", images, 32)
    splits = tmp_path / "splits.csv"
    with splits.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sop_instance_uid", "split"])
        writer.writerows([(f"2.{i}", "train") for i in range(20)] + [(f"2.{i}", "test") for i in range(20, 40)]
                         + [("2.near", "test"), ("2.unknown", "test")])
    report = json.loads(run("--index", str(tmp_path / "index"), "--splits-csv", str(splits), "--json").output)
    (pair,) = report["pairs"]
    assert report["unmatched_rows"] == 1 and report["leakage"]
    assert [item["ids"] for item in pair["near_duplicates"]["items"]] == [[1, 41]]
    assert pair["near_duplicates"]["items"][0]["splits"] == ["train", "test"]
    assert pair["exact_duplicates"]["count"] == 0   # 2.5 and its copy are both train: not across
    assert pair["patients"]["count"] == 0 and pair["same_images"]["count"] == 0


def test_bad_splits_are_one_line_errors(split_archive, tmp_path):
    root = split_archive
    one = run("--index", str(root / "index"), "--split", f"train={root / 'train'}")
    assert one.exit_code == 1 and "at least two splits" in one.output
    neither = CliRunner().invoke(mi, ["leakage", "--index", str(root / "index")])
    assert neither.exit_code == 2
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,fold\na,b\n")
    bad = run("--index", str(root / "index"), "--splits-csv", str(bad_csv))
    assert bad.exit_code == 1 and "needs a header row" in bad.output and "Traceback" not in bad.output
