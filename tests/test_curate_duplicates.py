"""mi duplicates: exact clusters (SOP Instance UID, file bytes), near clusters (cosine), their
relations, and the similarity distribution; on synthetic vectors whose answer is exact and on
real files (pydicom-data's RG1 chest CR in three transfer syntaxes)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from curate_synthetic import near, unit, write_index
from retrieval.commands import mi

DIM = 64
REPO = Path(__file__).parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "medimageinsight-tiny"


def planted(tmp_path: Path, n: int = 300):
    """n random images (cosines ~0 between them), plus planted: near-duplicate pairs at 0.995,
    a triple chained at 0.99, a shared SOP Instance UID, a copied file (same content hash), and
    a three-frame file whose frames are identical (never duplicates of each other)."""
    rng = np.random.default_rng(7)
    base = unit(rng.standard_normal((n, DIM)))
    images = [{"path": f"/data/img{i}.dcm", "embedding": base[i], "sop_instance_uid": f"1.2.{i}",
               "study_instance_uid": f"1.3.{i}", "series_instance_uid": f"1.4.{i}", "patient_hash": f"p{i % 50}"}
              for i in range(n)]
    near_pairs = [(0, n), (1, n + 1)]
    images += [{**images[0], "path": "/data/near0.dcm", "embedding": near(base[0], 0.995, rng), "sop_instance_uid": "9.0"},
               {**images[1], "path": "/data/near1.dcm", "embedding": near(base[1], 0.995, rng), "sop_instance_uid": "9.1",
                "study_instance_uid": "other"}]
    images += [{**images[2], "path": "/data/same_sop.dcm", "embedding": near(base[2], 0.9, rng)}]   # exact: SOP
    images += [{**images[3], "path": "/data/copy3.dcm", "sop_instance_uid": None, "content_hash": "hash-of-/data/img3.dcm"}]
    frame_vector = unit(rng.standard_normal(DIM))
    images += [{"path": "/data/cine.dcm", "frame": f, "embedding": frame_vector, "sop_instance_uid": "5.5"}
               for f in range(3)]
    write_index(tmp_path / "index", images, DIM)
    return tmp_path / "index", near_pairs


def invoke(*args: str):
    return CliRunner().invoke(mi, list(args), catch_exceptions=False)


def test_planted_clusters_are_found_exactly_with_their_relations(tmp_path):
    index, _ = planted(tmp_path)
    result = invoke("duplicates", "--index", str(index), "--threshold", "0.98", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    paths = sorted(sorted(m["path"] for m in c["members"]) for c in report["clusters"])
    assert paths == sorted([["/data/img0.dcm", "/data/near0.dcm"], ["/data/img1.dcm", "/data/near1.dcm"],
                            ["/data/img2.dcm", "/data/same_sop.dcm"], ["/data/copy3.dcm", "/data/img3.dcm"]])
    by_first = {sorted(m["path"] for m in c["members"])[0]: c for c in report["clusters"]}
    assert by_first["/data/img2.dcm"]["kind"] == "exact" and "same SOP Instance UID" in by_first["/data/img2.dcm"]["relations"]
    assert by_first["/data/copy3.dcm"]["kind"] == "exact" and "same file content" in by_first["/data/copy3.dcm"]["relations"]
    assert by_first["/data/img0.dcm"]["kind"] == "near"
    assert {"same study", "same patient"} <= set(by_first["/data/img0.dcm"]["relations"])
    assert "2 studies" in by_first["/data/img1.dcm"]["relations"]
    assert abs(by_first["/data/img0.dcm"]["min_similarity"] - 0.995) < 1e-4
    assert report["summary"] == {"clusters": 4, "exact_clusters": 2, "near_clusters": 2, "mixed_clusters": 0,
                                 "images_in_clusters": 8, "redundant_images": 4}
    q = report["nearest_similarity"]["quantiles"]
    assert q["max"] >= 0.995 and q["p50"] < 0.6  # random 64-d vectors are far apart
    assert sum(b["images"] for b in report["nearest_similarity"]["histogram"]) == report["images"]
    assert "depend on the model's weights" in report["nearest_similarity"]["note"]


def test_a_lower_threshold_joins_more_and_the_table_and_csv_agree(tmp_path):
    index, _ = planted(tmp_path)
    out = tmp_path / "dups.csv"
    result = invoke("duplicates", "--index", str(index), "--threshold", "0.89", "--csv", str(out))
    assert result.exit_code == 0
    assert "4 duplicate clusters" in result.output and "depend on the model's weights" in result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8 and {r["cluster"] for r in rows} == {"1", "2", "3", "4"}
    assert {r["path"] for r in rows if r["kind"] == "exact"} >= {"/data/img3.dcm", "/data/copy3.dcm"}


def test_exact_only_reads_no_vectors_and_frames_of_one_file_are_never_duplicates(tmp_path):
    index, _ = planted(tmp_path)
    report = json.loads(invoke("duplicates", "--index", str(index), "--exact-only", "--json").output)
    assert report["summary"]["clusters"] == 2 and "nearest_similarity" not in report
    full = json.loads(invoke("duplicates", "--index", str(index), "--threshold", "0.5", "--json").output)
    assert not any(m["path"] == "/data/cine.dcm" for c in full["clusters"] for m in c["members"])


def test_an_ivf_index_finds_every_planted_pair(tmp_path, monkeypatch):
    """Above FLAT_MAX_VECTORS the store's FAISS index is IVF (approximate): near duplicates still
    share a list and are found, with exact scores."""
    from indexer.store import vectors
    monkeypatch.setattr(vectors, "FLAT_MAX_VECTORS", 100)
    rng = np.random.default_rng(3)
    centres = unit(rng.standard_normal((20, DIM)))
    base = unit(centres[rng.integers(0, 20, 3000)] + 0.6 * unit(rng.standard_normal((3000, DIM))))
    images = [{"path": f"/d/{i}", "embedding": v} for i, v in enumerate(base)]
    images += [{"path": f"/d/dup{i}", "embedding": near(base[i], 0.99, rng)} for i in range(0, 3000, 30)]
    write_index(tmp_path / "index", images, DIM)
    from retrieval.curate.neighbours import scan
    from retrieval.curate.reader import IndexReader
    with IndexReader(tmp_path / "index") as reader:
        found = scan(reader, threshold=0.985)
    assert found.kind == "ivf"
    planted_pairs = {(i + 1, 3001 + j) for j, i in enumerate(range(0, 3000, 30))}
    assert planted_pairs <= {tuple(p) for p in found.pairs.tolist()}
    assert np.all(found.pair_scores >= 0.985)


def test_real_files_in_three_transfer_syntaxes(tmp_path):
    import data_store
    import indexer
    from encoders import load_model

    source = Path(data_store.__file__).parent / "data"
    data = tmp_path / "data"
    data.mkdir()
    for name in ("RG1_UNCR", "RG1_J2KR", "RG1_J2KI", "RG1_UNCI"):
        shutil.copy(source / f"{name}.dcm", data)
    shutil.copy(source / "RG1_UNCR.dcm", data / "copy.dcm")
    indexer.index_paths([data], tmp_path / "index", model=load_model(FIXTURE, device="cpu"), workers=0)

    exact = json.loads(invoke("duplicates", "--index", str(tmp_path / "index"), "--exact-only", "--json").output)
    groups = sorted(sorted(Path(m["path"]).name for m in c["members"]) for c in exact["clusters"])
    assert groups == [["RG1_J2KI.dcm", "RG1_UNCI.dcm"], ["RG1_UNCR.dcm", "copy.dcm"]]

    both = json.loads(invoke("duplicates", "--index", str(tmp_path / "index"), "--threshold", "0.999", "--pixels",
                             "--json").output)
    (cluster,) = both["clusters"]
    assert cluster["size"] == 5 and cluster["kind"] == "mixed"
    assert {"3 distinct SOP Instance UIDs", "4 distinct file contents", "2 distinct decoded pixel arrays",
            "different transfer syntax", "same study", "same patient"} <= set(cluster["relations"])
    pixels = {Path(m["path"]).name: m["pixel_group"] for m in cluster["members"]}
    assert pixels["RG1_UNCR.dcm"] == pixels["RG1_J2KR.dcm"] == pixels["copy.dcm"] != pixels["RG1_J2KI.dcm"]
    assert pixels["RG1_J2KI.dcm"] == pixels["RG1_UNCI.dcm"]
    syntax = {Path(m["path"]).name: m["transfer_syntax"] for m in cluster["members"]}
    assert "Lossless" in syntax["RG1_J2KR.dcm"] and syntax["RG1_UNCR.dcm"] == "Explicit VR Little Endian"


def test_no_index_is_one_line_and_exit_1(tmp_path):
    result = CliRunner().invoke(mi, ["duplicates", "--index", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no index at" in result.output and "Traceback" not in result.output
