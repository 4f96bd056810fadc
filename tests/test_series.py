"""Series-level vectors for CT and MR (issue 20): one per series, the normalised mean of its slices,
written by mi-index over real multi-file series, kept up to date as slices come and go, filled in by
the migration for an older index, and searched with `series` (mi-search --series); the default stays
image-level. With the tiny test model this checks the mechanics, not retrieval quality."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from indexer.store import IndexStore
from indexer.store.series import series_vector
from retrieval import QueryError, Searcher
from retrieval.request import SearchRequest

from old_index import as_schema_7
from raw_sqlite import fetch_rows, raw_db

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def write_series(folder: Path, source: str, slices: int, seed: int) -> str:
    """`slices` single-frame files of one new series (one study), each with its own pixels."""
    base = pydicom.dcmread(TEST_FILES / source)
    series, study = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    pixels = base.pixel_array.astype(np.int32)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(slices):
        ds = base.copy()
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        varied = np.roll(pixels, 7 * i, axis=0) + rng.integers(0, 200, pixels.shape) * (seed + 1)
        ds.PixelData = np.clip(varied, -1000, 3000).astype(base.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"slice{i:03d}.dcm")
    return series


def mi_index(*args) -> None:
    from indexer.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], env={"MI_MODEL": None, "MI_INDEX": None})
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    data = root / "data"
    uids = {"ct_a": write_series(data / "ct_a", "CT_small.dcm", 6, 0),
            "ct_b": write_series(data / "ct_b", "CT_small.dcm", 4, 3),
            "mr": write_series(data / "mr", "MR_small.dcm", 5, 1)}
    pydicom.dcmread(TEST_FILES / "CT_small.dcm").save_as(data / "lone.dcm")  # a series of one slice
    mi_index(data, "--index", root / "index", "--model", FIXTURE, "--workers", "0")
    return root, uids


def stored(index: Path, query: str, *params):
    return fetch_rows(index, query, params)


def vectors_of(index: Path, ids) -> np.ndarray:
    with IndexStore.open(index, readonly=True) as store:
        return store.vectors(list(ids))


def test_each_series_holds_the_unit_mean_of_its_slices(archive):
    root, uids = archive
    index = root / "index"
    counts = dict(stored(index, "SELECT series_instance_uid, slices FROM series"))
    assert {counts[uids[name]] for name in uids} == {6, 4, 5} and len(counts) == 4
    for name, uid in uids.items():
        slices = stored(index, "SELECT id FROM images WHERE series_instance_uid = ?", uid)
        vectors = vectors_of(index, [row_id for row_id, in slices])
        (blob, representative), = stored(index, "SELECT embedding, representative FROM series "
                                                "WHERE series_instance_uid = ?", uid)
        mean = vectors.mean(axis=0)
        np.testing.assert_allclose(np.frombuffer(blob, np.float32), mean / np.linalg.norm(mean), atol=1e-5)
        assert representative == slices[int(np.argmax(vectors @ (mean / np.linalg.norm(mean))))][0]


def test_series_search_returns_series_and_the_default_stays_image_level(archive):
    root, uids = archive
    with Searcher(root / "index") as searcher:
        (vector_id,), = stored(root / "index", "SELECT id FROM images WHERE series_instance_uid = ? "
                                               "ORDER BY id LIMIT 1", uids["ct_b"])
        query = vectors_of(root / "index", [vector_id])[0]
        hits = searcher.answer(SearchRequest.make((), k=10, series=True, duplicates=True), query)
        assert len(hits) == 4  # one per series, however many slices
        assert len({h.metadata["series_instance_uid"] for h in hits}) == 4
        by_series = {h.metadata["series_instance_uid"]: h for h in hits}
        assert by_series[uids["ct_a"]].in_group == by_series[uids["ct_a"]].metadata["series_slices"] == 6
        assert by_series[uids["mr"]].metadata["modality"] == "MR"
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        mr_only = searcher.answer(SearchRequest.make((), k=10, series=True, modality="MR"), query)
        assert [h.metadata["series_instance_uid"] for h in mr_only] == [uids["mr"]]
        images = searcher.answer(SearchRequest.make((), k=30, duplicates=True), query)
        assert len(images) == 16 and images[0].id == vector_id  # the default: every slice its own hit
        with pytest.raises(QueryError):
            SearchRequest.make((), series=True, group="study")


def test_series_follow_slices_removed_and_added(archive, tmp_path):
    import shutil

    root, uids = archive
    index = tmp_path / "index"
    shutil.copytree(root / "index", index)
    data = root / "data"
    with IndexStore.open(index) as store:
        store.lock()
        store.remove_roots([data / "ct_a" / "slice000.dcm", data / "ct_a" / "slice001.dcm"])
        (slices, blob), = stored(index, "SELECT slices, embedding FROM series WHERE series_instance_uid = ?",
                                 uids["ct_a"])
        left = stored(index, "SELECT id FROM images WHERE series_instance_uid = ?", uids["ct_a"])
        assert slices == 4 == len(left)
        np.testing.assert_allclose(np.frombuffer(blob, np.float32),
                                   series_vector(store.vectors([row_id for row_id, in left])), atol=1e-6)
        store.remove_roots([data / "mr"])
        assert stored(index, "SELECT count(*) FROM series WHERE series_instance_uid = ?", uids["mr"]) == [(0,)]
        rows = stored(index, "SELECT * FROM images WHERE series_instance_uid = ?", uids["ct_a"])
        columns = [c[1] for c in stored(index, "PRAGMA table_info(images)")]
        moved = dict(zip(columns, rows[0]))  # a slice indexed again under a new file: counted once more
        item = {"path": str(tmp_path / "copy.dcm"), "size": 1, "mtime_ns": 1, "content_hash": "x",
                "images": [{**{k: moved[k] for k in columns if k not in ("id", "path", "content_hash")},
                            "embedding": store.vectors([moved["id"]])[0]}]}
        store.commit(indexed=[item])
        assert stored(index, "SELECT slices FROM series WHERE series_instance_uid = ?", uids["ct_a"]) == [(5,)]


def test_an_older_index_gets_its_series_on_migration(archive, tmp_path):
    import shutil

    root, uids = archive
    index = tmp_path / "index"
    shutil.copytree(root / "index", index)
    as_schema_7(index)
    with raw_db(index) as conn:  # as schema 5 left it
        conn.execute("DROP TABLE series")
        conn.execute("DROP INDEX images_by_series")
        conn.execute("DROP INDEX images_by_body_part")  # migration 7's
        conn.execute("DROP INDEX images_by_view")
        conn.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    with IndexStore.open(index) as store:
        series, vectors = store.series()
    assert sorted(row[3] for row in series) == [1, 4, 5, 6] and vectors.shape[0] == 4


def test_mi_search_series_flag(archive):
    from retrieval.cli import main

    root, uids = archive
    query = root / "data" / "mr" / "slice002.dcm"
    result = CliRunner().invoke(main, [str(query), "--series", "--json", "--index", str(root / "index"),
                                       "--model", str(FIXTURE)], env={"MI_MODEL": None, "MI_INDEX": None})
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    hits = hits["hits"] if isinstance(hits, dict) else hits
    assert len(hits) == 4 and hits[0]["series_instance_uid"] == uids["mr"] and hits[0]["series_slices"] == 5
