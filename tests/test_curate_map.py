"""mi map: a stored 2D map keyed by the index generation, new images placed without moving the
old ones, removed images dropped, a refit when asked or when many images were added, a PNG, and
no identifier in any output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from curate_synthetic import unit, write_index
from retrieval.commands import mi
from retrieval.curate.imagemap import load_map

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "medimageinsight-tiny"
SUMMARY_KEYS = {"index", "generation", "points", "method", "refit", "refit_reason", "placed", "removed",
                "fitted_on", "file", "seconds"}


def images_around(centres, count, rng, start=0, folder="x"):
    return [{"path": f"/{folder}/{start + i}.dcm", "modality": ("CT", "MR")[i % 2],
             "embedding": unit(centres[i % 2] + 0.2 * unit(rng.standard_normal(centres.shape[1])))}
            for i in range(count)]


def run_map(index: Path, *args: str):
    result = CliRunner().invoke(mi, ["map", "--index", str(index), "--json", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert SUMMARY_KEYS <= set(summary)
    return summary


def generation_of(index: Path) -> int:
    from indexer.store import IndexStore
    with IndexStore.open(index, readonly=True) as store:
        return store.generation()


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_stored_by_generation_new_points_placed_old_ones_fixed_removed_ones_gone(tmp_path, method):
    if method == "tsne":
        pytest.importorskip("openTSNE")
    from indexer.store import IndexStore

    rng = np.random.default_rng(2)
    centres = unit(rng.standard_normal((2, 16)))
    index = write_index(tmp_path / "index", images_around(centres, 80, rng), 16)
    first = run_map(index, "--method", method)
    assert first["refit"] and first["refit_reason"] == "no map yet" and first["points"] == 80
    assert first["file"] == f"map.g{generation_of(index)}.npz" and (index / first["file"]).exists()
    ids, xy = load_map(index)
    assert ids.dtype == np.int64 and xy.dtype == np.float32 and xy.shape == (80, 2)
    assert ids.tolist() == list(range(1, 81))

    write_index(index, images_around(centres, 6, rng, start=1000), 16)       # 6 new images: 7.5% < 25%
    second = run_map(index, "--method", method)
    assert not second["refit"] and second["placed"] == 6 and second["points"] == 86
    assert second["generation"] == generation_of(index) and not (index / first["file"]).exists()
    ids2, xy2 = load_map(index)
    assert np.array_equal(ids2[:80], ids) and np.array_equal(xy2[:80], xy)   # the old points did not move
    # each new image lands nearer the old images of its own modality than the other's
    old_ct, old_mr = xy[0::2].mean(axis=0), xy[1::2].mean(axis=0)
    for row, new_xy in enumerate(xy2[80:]):
        own, other = (old_ct, old_mr) if row % 2 == 0 else (old_mr, old_ct)
        assert np.linalg.norm(new_xy - own) < np.linalg.norm(new_xy - other)

    with IndexStore.open(index) as store:
        store.commit(removed=["/x/3.dcm"])
    third = run_map(index, "--method", method)
    assert third["removed"] == 1 and third["points"] == 85 and not third["refit"]
    ids3, xy3 = load_map(index)
    assert 4 not in ids3.tolist()                                             # /x/3.dcm was id 4
    keep = ids2 != 4
    assert np.array_equal(ids3, ids2[keep]) and np.array_equal(xy3, xy2[keep])

    asked = run_map(index, "--method", method, "--refit")
    assert asked["refit"] and asked["refit_reason"] == "asked" and asked["fitted_on"] == 85


def test_many_added_images_refit_the_map(tmp_path):
    rng = np.random.default_rng(4)
    centres = unit(rng.standard_normal((2, 16)))
    index = write_index(tmp_path / "index", images_around(centres, 40, rng), 16)
    run_map(index, "--method", "pca")
    write_index(index, images_around(centres, 11, rng, start=500), 16)       # 11 > 25% of 40
    summary = run_map(index, "--method", "pca")
    assert summary["refit"] and "11 images added" in summary["refit_reason"] and summary["fitted_on"] == 51
    other = run_map(index, "--method", "tsne") if _has_opentsne() else None
    if other is not None:
        assert other["refit"] and "method changed" in other["refit_reason"]


def _has_opentsne() -> bool:
    import importlib.util
    return importlib.util.find_spec("openTSNE") is not None


def test_png_and_no_identifier_in_outputs(tmp_path_factory, tmp_path):
    import indexer
    from encoders import load_model
    from PIL import Image
    from pydicom.uid import generate_uid
    from test_curate_leakage import PLANTED_ID, PLANTED_NAME, write_dicom

    root = tmp_path_factory.mktemp("map")
    (root / "images").mkdir()
    for i in range(5):
        write_dicom(root / "images" / f"{i}.dcm", PLANTED_ID, generate_uid(), seed=200 + i)
    indexer.index_paths([root / "images"], root / "index", model=load_model(FIXTURE, device="cpu"), workers=0)
    png = tmp_path / "map.png"
    result = CliRunner().invoke(mi, ["map", "--index", str(root / "index"), "--method", "pca", "--png", str(png),
                                     "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["modalities"] == {"CR": 5} and summary["points"] == 5
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.size == (1024, 1024)
        assert len(picture.getcolors(1 << 16)) > 2          # dots and legend, not a blank page
    table = CliRunner().invoke(mi, ["map", "--index", str(root / "index"), "--method", "pca"])
    assert table.exit_code == 0 and "map of 5 images" in table.output
    stored = np.load(root / "index" / summary["file"], allow_pickle=False)
    assert all(stored[name].dtype.kind in "fiuU" for name in stored.files)   # arrays only, no objects
    for text in (result.output, table.output, png.read_bytes().decode("latin-1")):
        assert PLANTED_ID not in text and PLANTED_NAME.split("^")[0] not in text and "19491231" not in text


def test_errors_are_one_line(tmp_path):
    missing = CliRunner().invoke(mi, ["map", "--index", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    with pytest.raises(Exception, match="no map in"):
        load_map(tmp_path)


def test_placement_equals_opentsnes_own_transform_with_exact_neighbours():
    """mi map places new points through openTSNE's transform with a FAISS kNN and without the
    fitted points' own graph: the same positions as openTSNE's own exact affinities."""
    pytest.importorskip("openTSNE")
    from openTSNE import TSNE, TSNEEmbedding
    from openTSNE.affinity import PerplexityBasedNN

    from retrieval.curate.imagemap import _new_point_affinities

    rng = np.random.default_rng(0)
    fitted = rng.standard_normal((300, 10)).astype(np.float32)
    fitted[:150] += 3
    new = rng.standard_normal((12, 10)).astype(np.float32)
    new[:6] += 3
    layout = np.asarray(TSNE(perplexity=30, n_jobs=1, random_state=0).fit(fitted.astype(np.float64)))
    theirs = PerplexityBasedNN(fitted.astype(np.float64), perplexity=30, method="exact", n_jobs=1, random_state=0)
    expected = np.asarray(TSNEEmbedding(layout, theirs, random_state=0).transform(new.astype(np.float64)))
    ours = _new_point_affinities(PerplexityBasedNN, fitted, 30.0, 1)
    placed = np.asarray(TSNEEmbedding(layout, ours, random_state=0).transform(new.astype(np.float64)))
    assert np.abs(placed - expected).max() < 1e-3 * np.abs(expected).max()
