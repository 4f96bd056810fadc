"""Indexing from an older PACS over DIMSE (C-FIND, C-GET), against a real Orthanc: the same
instances, pixels and embeddings as over DICOMweb; deletions picked up; AE titles the archive
does not accept give one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import indexer
from encoders import load_model
from indexer.cli import main as mi_index
from orthanc_server import MISSING, Orthanc, dicom_files, rows, stocked

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
FIELDS = ("study_instance_uid", "series_instance_uid", "modality", "body_part", "study_date", "width", "height",
          "source_format", "patient_sex", "patient_age", "patient_hash", "frame")


def test_dimse_index_equals_dicomweb_index_and_follows_the_archive(tmp_path):
    model = load_model(FIXTURE, device="cpu", towers=("image",))
    # As an archive is set up for us: our AE title known, its own checked
    orthanc = Orthanc(tmp_path / "orthanc", extra={"DicomModalities": {"mi": ["MI-INDEX", "127.0.0.1", 1]},
                                                   "DicomCheckCalledAet": True}).start()
    try:
        ids = stocked(orthanc, dicom_files(8))  # JPEG 2000 and JPEG among them: sent as stored
        over_dimse = indexer.index_dimse(orthanc.dimse_url, tmp_path / "dimse", model=model, workers=1, batch_size=1)
        over_web = indexer.index_dicomweb(orthanc.url, tmp_path / "web", model=model, workers=0, batch_size=1)
        assert over_dimse["new"] == over_web["new"] == len(ids) and over_dimse["skipped"] == 0
        dimse, web = rows(tmp_path / "dimse"), rows(tmp_path / "web")
        assert dimse.keys() == web.keys()
        for uid, row in dimse.items():
            assert row["path"].startswith(orthanc.dimse_url + "/studies/")
            for name in FIELDS:
                assert row[name] == web[uid][name], (uid, name)
            np.testing.assert_array_equal(row["embedding"],
                                          web[uid]["embedding"])

        # mi-serve renders a DIMSE hit's thumbnail from the instance it retrieves (C-GET)
        from retrieval import Searcher
        from retrieval.server import thumbnail_png
        uid = next(iter(dimse))
        with Searcher(tmp_path / "dimse", model=model) as searcher:
            over_c_get = thumbnail_png(searcher, tmp_path / "dimse", dimse[uid]["id"])
        with Searcher(tmp_path / "web", model=model) as searcher:
            assert over_c_get == thumbnail_png(searcher, tmp_path / "web", web[uid]["id"])

        gone = next(iter(ids))
        orthanc.delete(ids[gone])
        again = indexer.index_dimse(orthanc.dimse_url, tmp_path / "dimse", model=model, workers=0)
        assert (again["removed"], again["unchanged"], again["new"]) == (1, len(ids) - 1, 0)

        for address, calling, expected in ((orthanc.dimse_url.replace("ORTHANC@", "OTHER@"), "MI-INDEX", "rejected"),
                                           (orthanc.dimse_url, "STRANGER", "may not allow C-FIND")):
            result = CliRunner().invoke(mi_index, [address, "--calling-aet", calling, "--index", str(tmp_path / "x")],
                                        env={"MI_MODEL": str(FIXTURE)})
            assert result.exit_code == 1 and expected in result.output, result.output
            assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    finally:
        orthanc.stop()
