"""mi export: ids, reports and clusters -> CSV / JSON rows, WADO-RS URLs and OHIF's DICOM JSON
manifest (studies > series > instances, each with its metadata and a dicomweb: URL)."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
from click.testing import CliRunner

from curate_synthetic import near, unit, write_index
from retrieval.commands import mi
from test_curate_leakage import PLANTED_ID, write_dicom

SERVICE = "dicomweb+http://pacs.example:8042/dicom-web"


def pacs_index(tmp_path):
    rng = np.random.default_rng(2)
    base = unit(rng.standard_normal((6, 16)))
    images = [{"path": f"{SERVICE}/studies/1.{i // 3}/series/2.{i // 3}/instances/3.{i}", "embedding": base[i],
               "sop_instance_uid": f"3.{i}", "study_instance_uid": f"1.{i // 3}", "series_instance_uid": f"2.{i // 3}",
               "modality": "CR", "patient_hash": "a" * 32} for i in range(6)]
    images.append({**images[0], "path": f"{SERVICE}/studies/1.0/series/2.0/instances/3.near",
                   "sop_instance_uid": "3.near", "embedding": near(base[0], 0.999, rng)})
    return write_index(tmp_path / "index", images, 16)


def run(*args):
    return CliRunner().invoke(mi, ["export", *args], catch_exceptions=False)


def test_ids_as_csv_json_and_wado_urls(tmp_path):
    index = str(pacs_index(tmp_path))
    rows = list(csv.DictReader(io.StringIO(run("--index", index, "--ids", "1,4").output)))
    assert [r["id"] for r in rows] == ["1", "4"] and rows[1]["study_instance_uid"] == "1.1"
    as_json = json.loads(run("--index", index, "--ids", "2", "--format", "json").output)
    assert as_json[0]["wado_rs_url"] == "http://pacs.example:8042/dicom-web/studies/1.0/series/2.0/instances/3.1"
    urls = run("--index", index, "--ids", "1,2,3", "--format", "wado").output.split()
    assert urls == [f"http://pacs.example:8042/dicom-web/studies/1.0/series/2.0/instances/3.{i}" for i in range(3)]
    missing = CliRunner().invoke(mi, ["export", "--index", index, "--ids", "99"])
    assert missing.exit_code == 1 and "no images with ids [99]" in missing.output


def test_a_duplicate_cluster_as_an_ohif_manifest(tmp_path):
    index = str(pacs_index(tmp_path))
    report = tmp_path / "dups.json"
    report.write_text(CliRunner().invoke(mi, ["duplicates", "--index", index, "--threshold", "0.99", "--json"]).output)
    manifest = json.loads(run("--index", index, "--report", str(report), "--cluster", "1", "--format", "ohif").output)
    (study,) = manifest["studies"]
    assert study["StudyInstanceUID"] == "1.0" and study["NumInstances"] == 2 and study["PatientID"] == "a" * 32
    (series,) = study["series"]
    assert series["SeriesInstanceUID"] == "2.0" and series["Modality"] == "CR"
    assert sorted(i["url"] for i in series["instances"]) == [
        "dicomweb:http://pacs.example:8042/dicom-web/studies/1.0/series/2.0/instances/3.0",
        "dicomweb:http://pacs.example:8042/dicom-web/studies/1.0/series/2.0/instances/3.near"]
    assert {i["metadata"]["SOPInstanceUID"] for i in series["instances"]} == {"3.0", "3.near"}
    wrong = CliRunner().invoke(mi, ["export", "--index", index, "--report", str(report), "--cluster", "9"])
    assert wrong.exit_code == 1 and "no cluster 9" in wrong.output


def test_local_files_need_a_url_prefix_and_carry_image_attributes_but_no_patient(tmp_path):
    import indexer
    from encoders import load_model
    from pydicom.uid import generate_uid

    from test_curate_leakage import FIXTURE
    data = tmp_path / "data"
    data.mkdir()
    write_dicom(data / "a.dcm", PLANTED_ID, generate_uid(), 1)
    indexer.index_paths([data], tmp_path / "index", model=load_model(FIXTURE, device="cpu"), workers=0)
    index = str(tmp_path / "index")
    refused = CliRunner().invoke(mi, ["export", "--index", index, "--ids", "1", "--format", "ohif"])
    assert refused.exit_code == 1 and "--url-prefix" in refused.output
    text = run("--index", index, "--ids", "1", "--format", "ohif", "--url-prefix", "http://localhost:8000/").output
    instance = json.loads(text)["studies"][0]["series"][0]["instances"][0]
    assert instance["url"] == "dicomweb:http://localhost:8000/a.dcm"
    assert instance["metadata"]["Rows"] == 64 and instance["metadata"]["BitsStored"] == 12
    assert PLANTED_ID not in text and "Leakington" not in text and "19491231" not in text
