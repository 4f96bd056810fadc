"""Search folds near duplicates of the same study behind a flag (mi-search --fold-near, fold_near= in the
library, the server and the client): pydicom-data's RG1 chest CR in three transfer syntaxes (three SOP
Instance UIDs, one study) fill the top hits without it and are one hit with three copies with it; the same
pixels saved as another study are never folded into them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.cli import main as mi_search
from retrieval.grouping import Candidate, collapse
from retrieval.request import SearchRequest
from servers import FIXTURE, PYDICOM_FILES

RG1 = ("RG1_UNCR", "RG1_J2KR", "RG1_J2KI")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """RG1 in three syntaxes (one study), the same pixels as a follow-up study (new Study and SOP Instance
    UIDs), a CT and an MR; indexed with the tiny model."""
    import data_store
    import indexer
    import pydicom
    from encoders import load_model
    from pydicom.uid import generate_uid

    source = Path(data_store.__file__).parent / "data"
    root = tmp_path_factory.mktemp("fold")
    data = root / "data"
    data.mkdir()
    for name in RG1:
        shutil.copy(source / f"{name}.dcm", data)
    followup = pydicom.dcmread(source / "RG1_UNCR.dcm")
    followup.StudyInstanceUID, followup.SeriesInstanceUID = generate_uid(), generate_uid()
    followup.SOPInstanceUID = followup.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    followup.save_as(data / "followup.dcm")
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(PYDICOM_FILES / name, data)
    model = load_model(FIXTURE, device="cpu")
    indexer.index_paths([data], root / "index", model=model, workers=0)
    return {"data": data, "index": root / "index", "model": model}


def search(archive, *options: str) -> list[dict]:
    """mi-search's hits for a text (the tiny model ranks texts arbitrarily; k=6 asks every image)."""
    result = CliRunner().invoke(mi_search, ["chest", "--index", str(archive["index"]), "--model", str(FIXTURE),
                                            "--no-server", "--json", "-k", "6", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def names(hits) -> list[str]:
    return [Path(hit["path"] if isinstance(hit, dict) else hit.path).stem for hit in hits]


def test_without_the_flag_one_film_in_three_syntaxes_fills_the_top_hits(archive):
    from retrieval.search import Searcher

    with Searcher(archive["index"], model=archive["model"]) as searcher:
        (uncr,) = [hit.id for hit in searcher.search(vector=np.ones(searcher.model_info["dim"], np.float32), k=6)
                   if Path(hit.path).stem == "RG1_UNCR"]
        hits = searcher.search(vector=searcher.vector_of(uncr), k=4)
    assert set(names(hits)) == {*RG1, "followup"} and [hit.copies for hit in hits] == [1] * 4
    everything = search(archive)
    assert len(everything) == 6 and all(hit["copies"] == 1 for hit in everything)


def test_with_the_flag_they_are_one_hit_with_three_copies_and_the_other_study_stays(archive):
    hits = search(archive, "--fold-near")  # alone: the duplicate checks' default threshold
    assert len(hits) == 4 and {"CT_small", "MR_small", "followup"} <= set(names(hits))
    (film,) = [hit for hit in hits if Path(hit["path"]).stem in RG1]
    assert film["copies"] == 3
    assert [hit["copies"] for hit in hits if hit is not film] == [1, 1, 1]  # the follow-up study: never folded
    assert names(search(archive, "--fold-near", "0.98")) == names(hits)
    assert CliRunner().invoke(mi_search, ["x", "--fold-near", "1.5", "--no-server"]).exit_code == 2


def test_the_library_the_server_and_the_client_take_the_same_option(archive):
    from fastapi.testclient import TestClient

    from retrieval.search import Searcher
    from retrieval.server import create_app

    request = SearchRequest.make(k=4, fold_near=0.98)
    assert SearchRequest.make(**request.to_json()) == request  # what the client sends, the server reads back
    with Searcher(archive["index"], model=archive["model"]) as searcher:
        everything = searcher.search(vector=np.ones(searcher.model_info["dim"], np.float32), k=6)
        like = [hit.id for hit in everything if Path(hit.path).stem == "RG1_J2KR"][0]
        folded = searcher.search(vector=searcher.vector_of(like), k=4, fold_near=0.98)
    assert sorted(hit.copies for hit in folded) == [1, 1, 1, 3]
    client = TestClient(create_app(archive["index"], model=archive["model"]))
    answer = client.get("/api/results", params={"like": like, "k": 4, "fold_near": 0.98})
    assert answer.status_code == 200, answer.text
    assert [(hit["id"], hit["copies"]) for hit in answer.json()["hits"]] == [(hit.id, hit.copies) for hit in folded]
    refused = client.get("/api/results", params={"like": like, "fold_near": 2})
    assert refused.status_code == 400 and "fold_near" in refused.json()["error"]


def test_only_a_kept_hit_of_the_same_study_above_the_threshold_takes_a_copy():
    a = np.array([1.0, 0.0], np.float32)
    close = np.array([0.99, np.sqrt(1 - 0.99 ** 2)], np.float32)
    far = np.array([0.9, np.sqrt(1 - 0.9 ** 2)], np.float32)

    def row(study, sop):
        return {"study_instance_uid": study, "sop_instance_uid": sop}

    candidates = [Candidate(0.9, 1, row("s1", "1"), a), Candidate(0.89, 2, row("s1", "2"), close),
                  Candidate(0.88, 3, row("s1", "3"), far), Candidate(0.87, 4, row("s2", "4"), a),
                  Candidate(0.86, 5, row(None, "5"), a), Candidate(0.85, 6, row(None, "6"), a)]
    hits = collapse(candidates, fold_near=0.98)
    assert [(hit.best.id, hit.copies) for hit in hits] == [(1, 2), (3, 1), (4, 1), (5, 1), (6, 1)]
    assert [hit.copies for hit in collapse(candidates)] == [1] * 6
