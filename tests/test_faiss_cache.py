"""The FAISS file is a cache tied to its database: another database's, a damaged one or one of
another dimension is never used; an open Searcher answers from the newest generation."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import indexer
from encoders import load_model
from indexer.store import IndexStore
from retrieval import Searcher

from made_images import make_images

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu")


def _top(index_dir: Path, model, query: Path, k: int = 3):
    with Searcher(index_dir, model=model) as searcher:
        return [(Path(hit.path).name, round(hit.score, 5)) for hit in searcher.search(image=query, k=k)]


def test_a_cache_left_by_another_database_is_never_used(tmp_path, model):
    first, second = tmp_path / "first", tmp_path / "second"
    make_images(first, 6, seed=1)
    make_images(second, 6, seed=2)  # the same names, other pictures
    index_dir = tmp_path / "index"
    indexer.index_paths([first], index_dir, model=model, workers=0)
    stale = list(index_dir.glob("vectors.*"))
    moved = tmp_path / "moved-away"
    index_dir.rename(moved)  # "move it away and run mi-index again"...
    index_dir.mkdir()
    for path in stale:  # ...with the old cache file left in the folder
        shutil.copy(moved / path.name, index_dir / path.name)
    indexer.index_paths([second], index_dir, model=model, workers=0)
    assert _top(index_dir, model, second / "img004.png")[0] == ("img004.png", 1.0)
    assert all(str(second) in hit.path for hit in Searcher(index_dir, model=model).search(
        image=second / "img004.png", k=6))


def test_a_damaged_cache_is_rebuilt_and_scores_stay_cosines(tmp_path, model):
    data = tmp_path / "data"
    make_images(data, 8)
    index_dir = tmp_path / "index"
    indexer.index_paths([data], index_dir, model=model, workers=0)
    expected = _top(index_dir, model, data / "img003.png")
    (cache,) = index_dir.glob("vectors.*")
    raw = bytearray(cache.read_bytes())
    vector_bytes = model.dim * 4
    for offset in range(len(raw) - 8 * vector_bytes - 200, len(raw) - 200, 4):  # the exponents of the vectors
        raw[offset + 3] ^= 0x40
    cache.write_bytes(bytes(raw))
    with Searcher(index_dir, model=model) as searcher:
        hits = searcher.search(image=data / "img003.png", k=8)
    assert all(-1.0 <= hit.score <= 1.0 for hit in hits)
    assert [(Path(h.path).name, round(h.score, 5)) for h in hits[:3]] == expected

    again = indexer.index_paths([data], index_dir, model=model, workers=0)  # unchanged run repairs the cache
    assert again["unchanged"] == 8 and again["encoded"] == 0
    with IndexStore.open(index_dir, readonly=True) as store:
        index = store.load_faiss_with_generation()[0]
        stored = store.vectors([1])
        np.testing.assert_array_equal(index.reconstruct(1), stored[0])
    assert cache.read_bytes() != bytes(raw)


def test_a_cache_of_another_dimension_is_rebuilt(tmp_path, model):
    import faiss

    data = tmp_path / "data"
    make_images(data, 4)
    index_dir = tmp_path / "index"
    indexer.index_paths([data], index_dir, model=model, workers=0)
    (cache,) = index_dir.glob("vectors.*")
    wrong = faiss.IndexIDMap2(faiss.IndexFlatIP(7))
    wrong.add_with_ids(np.eye(4, 7, dtype=np.float32), np.arange(1, 5, dtype=np.int64))
    faiss.write_index(wrong, str(cache))
    assert _top(index_dir, model, data / "img002.png", k=1) == [("img002.png", 1.0)]


def test_k_is_clamped_to_the_index_size(tmp_path, model):
    data = tmp_path / "data"
    make_images(data, 3)
    indexer.index_paths([data], tmp_path / "index", model=model, workers=0)
    with Searcher(tmp_path / "index", model=model) as searcher:
        assert len(searcher.search("anything", k=1_000_000_000)) == 3


def test_an_open_searcher_answers_from_the_newest_generation(tmp_path, model):
    data = tmp_path / "data"
    paths = make_images(data, 3)
    index_dir = tmp_path / "index"
    indexer.index_paths([data], index_dir, model=model, workers=0)
    with Searcher(index_dir, model=model) as searcher:
        assert len(searcher.search("x", k=10)) == 3
        Image.fromarray(np.full((64, 64), 9, np.uint8)).save(data / "added.png")
        indexer.index_paths([data], index_dir, model=model, workers=0)  # only an addition: nothing fails
        assert len(searcher.search("x", k=10)) == len(searcher) == 4
        (data / "added.png").unlink()
        make_images(tmp_path / "more", 2, seed=9)
        for path in (tmp_path / "more").iterdir():
            shutil.move(path, data / f"new-{path.name}")
        paths[0].unlink()
        indexer.index_paths([data], index_dir, model=model, workers=0)  # +2 -1 while the searcher is open
        hits = searcher.search("x", k=10)
        assert len(hits) == len(searcher) == 4
        assert {Path(hit.path).name for hit in hits} == {p.name for p in data.iterdir()}
