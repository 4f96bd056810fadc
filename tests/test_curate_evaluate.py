"""mi evaluate: retrieval precision@k and mAP, kNN accuracy and AUC with the query's own patient
and study left out, zero-shot AUC from prompts; a rank AUC checked against a pairwise count."""
from __future__ import annotations

import csv
import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from curate_synthetic import write_index
from retrieval.commands import mi
from retrieval.curate.metrics import average_precision, roc_auc

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "medimageinsight-tiny"


def run(*args: str):
    return CliRunner().invoke(mi, ["evaluate", *args], catch_exceptions=False)


def pairwise_auc(scores, positive) -> float:
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg)) / (len(pos) * len(neg))


def test_rank_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        scores = rng.integers(0, 5, n).astype(float)        # many ties
        positive = rng.random(n) < 0.4
        if positive.all() or not positive.any():
            assert roc_auc(scores, positive) is None
            continue
        assert roc_auc(scores, positive) == pytest.approx(pairwise_auc(scores, positive), abs=1e-12)


def test_average_precision_by_hand():
    ap = average_precision(np.array([[0, 0, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0]], bool))
    assert ap[0] == pytest.approx((1 / 3 + 2 / 4) / 2) and ap[1] == pytest.approx((1 + 2 / 4) / 2)
    assert np.isnan(ap[2])


# Unit vectors in a plane at these angles (degrees), so every ranking is known. q and s share a
# patient, q and t a study: q's neighbours must skip both, so its nearest is b1 (label b).
PLANTED = [("q", 0, "a", "P-q", "S-q"), ("s", 1, "a", "P-q", "S-s"), ("t", 3, "a", "P-t", "S-q"),
           ("b1", 30, "b", "P-b1", "S-b1"), ("b2", 40, "b", "P-b2", "S-b2"),
           ("a2", 90, "a", "P-a2", "S-a2"), ("a3", 100, "a", "P-a3", "S-a3")]


@pytest.fixture
def planted_index(tmp_path):
    images = []
    for name, angle, _label, patient, study in PLANTED + [("unlabelled", 45, None, "P-u", "S-u")]:
        v = np.zeros(8, np.float32)
        v[:2] = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        images.append({"path": f"/x/{name}.dcm", "embedding": v, "sop_instance_uid": f"1.{angle}",
                       "patient_hash": patient.encode().hex().ljust(32, "0"), "study_instance_uid": study})
    write_index(tmp_path / "index", images, 8)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels"])
        writer.writerows([(f"/x/{name}.dcm", label) for name, _, label, _, _ in PLANTED])
        writer.writerows([("/x/a3.dcm", "a"), ("/x/not-indexed.dcm", "b")])   # a repeat, and a stranger
    return tmp_path / "index", labels


def test_planted_answers_with_patient_and_study_left_out(planted_index, tmp_path):
    index, labels = planted_index
    result = run("--index", str(index), "--labels", str(labels), "-k", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["labelled_images"] == 7 and report["unmatched_rows"] == 1 and report["labels"] == ["a", "b"]
    per = {e["label"]: e for e in report["per_label"]}
    # k=1: only q is wrong (its nearest allowed image is b1); with q's patient or study counted it would be right
    assert report["knn"]["accuracy"] == pytest.approx(6 / 7)
    assert per["a"]["precision_at_k"] == pytest.approx(0.8) and per["b"]["precision_at_k"] == 1.0
    # average precision over the whole ranking, by hand (see the angles): q 5/12, s and t 0.7, a2 and a3 83/120
    assert per["a"]["average_precision"] == pytest.approx((5 / 12 + 0.7 + 0.7 + 83 / 120 + 83 / 120) / 5, abs=1e-6)
    assert per["b"]["average_precision"] == 1.0
    assert report["retrieval"]["map"] == pytest.approx((per["a"]["average_precision"] + 1.0) / 2, abs=1e-6)
    assert per["a"]["knn_auc"] == pytest.approx(0.9) and per["b"]["knn_auc"] == pytest.approx(0.9)
    assert report["knn"]["macro_auc"] == pytest.approx(0.9) and report["zero_shot"] is None
    table = run("--index", str(index), "--labels", str(labels), "-k", "1")
    assert table.exit_code == 0 and "accuracy 0.857" in table.output and "mAP" in table.output


def test_one_row_per_label_and_semicolons_read_the_same(planted_index, tmp_path):
    from retrieval.curate.labelled import read_labels
    from retrieval.curate.reader import IndexReader

    index, _ = planted_index
    one = tmp_path / "one.csv"
    one.write_text("path,label\n/x/q.dcm,a\n/x/q.dcm,b\n/x/s.dcm,a\n")
    semi = tmp_path / "semi.csv"
    semi.write_text("path,labels\n/x/q.dcm, a ; b\n/x/s.dcm,a\n")
    with IndexReader(index) as reader:
        first, second = read_labels(reader, one), read_labels(reader, semi)
    assert first.names == second.names == ["a", "b"]
    assert first.ids.tolist() == second.ids.tolist() == [1, 2]
    assert first.matrix.tolist() == second.matrix.tolist() == [[True, True], [True, False]]


def test_bad_labels_files_are_one_line_errors(planted_index, tmp_path):
    index, _ = planted_index
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na,b\n")
    result = run("--index", str(index), "--labels", str(bad))
    assert result.exit_code == 1 and "needs a header row" in result.output and "Traceback" not in result.output
    none = tmp_path / "none.csv"
    none.write_text("path,labels\n/elsewhere.dcm,a\n")
    result = run("--index", str(index), "--labels", str(none))
    assert result.exit_code == 1 and "no row of" in result.output
    result = run("--index", str(index), "--labels", str(none), "--prompt", "no placeholder")
    assert result.exit_code == 2 and "{label}" in result.output
    assert CliRunner().invoke(mi, ["evaluate", "--index", str(index)]).exit_code == 2   # --labels is required


@pytest.fixture(scope="module")
def dicom_archive(tmp_path_factory):
    """Six real DICOM files (pydicom-written, with planted names and IDs) indexed with the tiny model."""
    import indexer
    from encoders import load_model
    from pydicom.uid import generate_uid
    from test_curate_leakage import PLANTED_ID, write_dicom

    root = tmp_path_factory.mktemp("evaluate")
    (root / "images").mkdir()
    study = generate_uid()
    for i in range(6):
        write_dicom(root / "images" / f"{i}.dcm", PLANTED_ID if i < 2 else f"P-OTHER-{i}",
                    study if i < 2 else generate_uid(), seed=100 + i)
    indexer.index_paths([root / "images"], root / "index", model=load_model(FIXTURE, device="cpu"), workers=0)
    labels = root / "labels.csv"
    labels.write_text("path,labels\n" + "".join(f"images/{i}.dcm,{'effusion' if i % 2 else 'normal'}\n"
                                                for i in range(6)))
    return root


def test_zero_shot_auc_matches_an_independent_computation_and_shows_no_identifier(dicom_archive):
    from encoders import load_model

    from indexer.store import IndexStore
    from test_curate_leakage import PLANTED_ID, PLANTED_NAME

    root = dicom_archive
    template = "a chest x-ray showing {label}"
    result = run("--index", str(root / "index"), "--labels", str(root / "labels.csv"), "--model", str(FIXTURE),
                 "--prompt", template, "-k", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["zero_shot"]["prompts"] == ["a chest x-ray showing effusion", "a chest x-ray showing normal"]
    model = load_model(FIXTURE, device="cpu")
    texts = model.encode_texts(report["zero_shot"]["prompts"]).astype(np.float64)
    with IndexStore.open(root / "index", readonly=True) as store:
        rows = store.rows(range(1, 7))
        ids = sorted(rows)
        images = store.vectors(ids).astype(np.float64)
    logits = model.logit_scale * images @ texts.T
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    effusion = [int(Path(rows[i]["path"]).stem) % 2 == 1 for i in ids]
    per = {e["label"]: e for e in report["per_label"]}
    assert per["effusion"]["zero_shot_auc"] == pytest.approx(pairwise_auc(probabilities[:, 0], effusion), abs=1e-6)
    assert per["normal"]["zero_shot_auc"] == pytest.approx(
        pairwise_auc(probabilities[:, 1], [not e for e in effusion]), abs=1e-6)
    assert report["without_patient"] == 0 and report["without_study"] == 0
    table = run("--index", str(root / "index"), "--labels", str(root / "labels.csv"), "--model", str(FIXTURE),
                "--zero-shot")
    assert table.exit_code == 0 and "zero-shot ({label})" in table.output
    for text in (result.output, table.output):
        assert PLANTED_ID not in text and PLANTED_NAME.split("^")[0] not in text and "19491231" not in text
