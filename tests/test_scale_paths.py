"""The paths a large archive takes (issue 20): filtered ids through raw sqlite3 and an index range,
filtered search equal to brute force, small changes as a delta over the FAISS file, --remove of a
subfolder that stays removed and happens in one transaction, and a walk without a realpath per file."""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import event

from indexer.filters import SearchFilters
from indexer.store import IndexStore
from indexer.store import faiss_cache
from indexer.store.sql import at_or_under
from retrieval.request import SearchRequest
from retrieval.search import Searcher

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def item(path: str, vector: np.ndarray, i: int) -> dict:
    return {"path": path, "size": 1, "mtime_ns": 1, "content_hash": f"h{i}-{len(path)}",
            "images": [{"frame": 0, "embedding": vector, "modality": ("CR", "CT", "MR")[i % 3],
                        "study_date": (dt.date(2020, 1, 1) + dt.timedelta(days=i % 365)).isoformat()}]}


def built(folder: Path, paths: list[str], seed: int = 0) -> np.ndarray:
    vectors = unit(np.random.default_rng(seed).standard_normal((len(paths), DIM)))
    with IndexStore.open(folder, create=True) as store:
        store.commit(indexed=[item(p, v, i) for i, (p, v) in enumerate(zip(paths, vectors))])
        store.write_faiss()
    return vectors


def ids_of(store: IndexStore, filters: SearchFilters) -> set[str]:
    rows = store.rows(store.filter_ids(filters).tolist())
    return {row["path"] for row in rows.values()}


TRICKY = ["/r/data/a.dcm", "/r/data/sub/b.dcm", "/r/data2/c.dcm", "/r/data.old/d.dcm", "/r/da%ta/e.dcm",
          "/r/da_ta/f.dcm", "/r/dxta/g.dcm", os.fsdecode(b"/r/data/\xff\xfe.dcm"), os.fsdecode(b"/r/\xe9t\xe9/h.dcm"),
          "/r/data"]


def test_folder_filter_is_an_index_range_with_tricky_names(tmp_path):
    built(tmp_path / "idx", TRICKY)
    with IndexStore.open(tmp_path / "idx", readonly=True) as store:
        assert ids_of(store, SearchFilters(under="/r/data")) == {
            "/r/data", "/r/data/a.dcm", "/r/data/sub/b.dcm", os.fsdecode(b"/r/data/\xff\xfe.dcm")}
        assert ids_of(store, SearchFilters(under="/r/da%ta")) == {"/r/da%ta/e.dcm"}  # no LIKE wildcards
        assert ids_of(store, SearchFilters(under="/r/da_ta")) == {"/r/da_ta/f.dcm"}
        assert ids_of(store, SearchFilters(under=os.fsdecode(b"/r/\xe9t\xe9"))) == {os.fsdecode(b"/r/\xe9t\xe9/h.dcm")}
        assert ids_of(store, SearchFilters(under="/r/data/a.dcm")) == {"/r/data/a.dcm"}  # a file
        assert set(store.files_under(["/r/data2"])) == {"/r/data2/c.dcm"}
        where, params = at_or_under("/r/data")
        with store.engine.connect() as conn:
            plan = conn.connection.driver_connection.execute(
                f"EXPLAIN QUERY PLAN SELECT id FROM images WHERE {where}", params).fetchall()
        assert all("SCAN" not in step[-1] for step in plan), plan  # the path index answers, no full scan


def exact_top(vectors: np.ndarray, allowed: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    scores = vectors[allowed - 1] @ query  # ids are 1-based rows here
    return [int(i) for i in allowed[np.argsort(-scores, kind="stable")[:k]]]


@pytest.mark.parametrize("rows", [600, 3000])  # flat, and IVF (FLAT_MAX_VECTORS lowered below)
def test_filtered_results_equal_brute_force_over_the_filter(tmp_path, monkeypatch, rows):
    from indexer.store import vectors as vector_index
    monkeypatch.setattr(vector_index, "FLAT_MAX_VECTORS", 1000)
    paths = [f"/p/f{i % 7}/img{i}.dcm" for i in range(rows)]
    vectors = built(tmp_path / "idx", paths)
    queries = unit(vectors[:5] + 0.3 * np.random.default_rng(1).standard_normal((5, DIM)))
    cases = [SearchFilters.make(modality="ct"), SearchFilters(under="/p/f3"),
             SearchFilters.make(since="2020-03-01", until="2020-04-30"),
             SearchFilters.make(modality="MR", under="/p/f1")]
    with Searcher(tmp_path / "idx") as searcher:
        for filters in cases:
            allowed = np.sort(searcher._store.filter_ids(filters))
            assert len(allowed) > 10
            for query in queries:
                hits = searcher.answer(SearchRequest.make((), filters=filters, k=10, duplicates=True), query)
                assert [h.id for h in hits] == exact_top(vectors, allowed, query, 10)
                assert searcher._allowed(filters) is searcher._allowed(filters)  # cached per generation


def test_small_change_is_a_delta_searched_without_rewriting_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(faiss_cache, "DELTA_FROM_ROWS", 100)
    folder = tmp_path / "idx"
    vectors = built(folder, [f"/d/img{i}.dcm" for i in range(400)])
    (cached,) = folder.glob("vectors.*")
    written = cached.stat().st_mtime_ns
    with Searcher(folder) as searcher:
        assert searcher.search(vector=vectors[0], k=1, duplicates=True)[0].path == "/d/img0.dcm"
        new = unit(np.random.default_rng(7).standard_normal((1, DIM)))[0]
        with IndexStore.open(folder) as store:
            store.lock()
            store.commit(indexed=[item("/d/new.dcm", new, 0)])
            store.write_faiss()
            assert list(folder.glob("vectors.*")) == [cached] and cached.stat().st_mtime_ns == written
            hit = searcher.search(vector=new, k=1, duplicates=True)[0]  # the running reader sees it
            assert hit.path == "/d/new.dcm" and hit.score == pytest.approx(1.0, abs=1e-5)
            store.remove_root("/d/img0.dcm")
            store.write_faiss()
            assert list(folder.glob("vectors.*")) == [cached]
            assert all(h.path != "/d/img0.dcm" for h in searcher.search(vector=vectors[0], k=5, duplicates=True))
            filtered = searcher.search(vector=new, k=3, duplicates=True, modality="CR")
            assert filtered[0].path == "/d/new.dcm"
        with Searcher(folder) as fresh:  # a new reader: the file brought up to date on load
            assert fresh.search(vector=new, k=1, duplicates=True)[0].path == "/d/new.dcm"
            assert len(fresh) == 400


def test_large_change_rewrites_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(faiss_cache, "DELTA_FROM_ROWS", 100)
    folder = tmp_path / "idx"
    built(folder, [f"/d/img{i}.dcm" for i in range(400)])
    (cached,) = folder.glob("vectors.*")
    extra = unit(np.random.default_rng(3).standard_normal((50, DIM)))  # more than a tenth
    with IndexStore.open(folder) as store:
        store.commit(indexed=[item(f"/d/more{i}.dcm", v, i) for i, v in enumerate(extra)])
        written = store.write_faiss()
        assert written != cached and not cached.exists()
        assert written.name.endswith(f".g{store.generation()}.faiss")


def test_removing_a_fifth_keeps_the_file_and_leaves_the_rows_out(tmp_path, monkeypatch):
    # --remove of 10% at 1M rewrote the 2 GB FAISS file (~10 s): removed rows are now tombstones
    # (left out by the reader, removed on load) up to DELTA_MAX_REMOVED of the file, then compacted.
    monkeypatch.setattr(faiss_cache, "DELTA_FROM_ROWS", 100)
    folder = tmp_path / "idx"
    vectors = built(folder, [f"/d/f{i % 5}/img{i}.dcm" for i in range(400)])
    (cached,) = folder.glob("vectors.*")
    written = cached.stat().st_mtime_ns
    gone = vectors[0]  # /d/f0/img0.dcm
    with Searcher(folder) as searcher:
        assert searcher.search(vector=gone, k=1, duplicates=True)[0].path == "/d/f0/img0.dcm"
        with IndexStore.open(folder) as store:
            store.lock()
            assert store.remove_roots(["/d/f0"]) == 80  # a fifth: more than the tenth added rows may be
            store.write_faiss()
            assert list(folder.glob("vectors.*")) == [cached] and cached.stat().st_mtime_ns == written
            hits = searcher.search(vector=gone, k=400, duplicates=True)
            assert len(hits) == 320 and not any(h.path.startswith("/d/f0/") for h in hits)
            with Searcher(folder) as fresh:  # a new reader removes them on load
                assert not any(h.path.startswith("/d/f0/") for h in fresh.search(vector=gone, k=400, duplicates=True))
                assert fresh._faiss.base.ntotal == 320
            assert store.remove_roots(["/d/f1"]) == 80  # 40% of the file's rows gone: compacted
            rewritten = store.write_faiss()
            assert rewritten != cached and not cached.exists()
    with Searcher(folder) as fresh:
        assert len(fresh.search(vector=gone, k=400, duplicates=True)) == 240
        assert fresh._faiss.base.ntotal == 240 and fresh._faiss.gone is None


def test_removing_several_roots_is_one_commit(tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    built(folder, ["/a/x/1.dcm", "/a/x/2.dcm", "/a/y/3.dcm", "/a/z/4.dcm"])
    # the clearing of removed vectors after the commit is a commit of its own (test_vector_file)
    monkeypatch.setattr(IndexStore, "clear_removed_vectors", lambda self: None)
    with IndexStore.open(folder) as store:
        commits = []
        event.listen(store.engine, "commit", lambda conn: commits.append(1))
        assert store.remove_roots(["/a/x", "/a/y"]) == 3
        assert len(commits) == 1 and store.count() == 1


def make_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)


def test_removed_subfolder_stays_removed_after_update(tmp_path):
    from indexer.cli import main as mi_index

    data = tmp_path / "data"
    for i in range(3):
        make_png(data / f"top{i}.png", 10 + i)
        make_png(data / "sub" / f"in{i}.png", 100 + i)
    common = ["--index", str(tmp_path / "index"), "--workers", "0"]
    assert CliRunner().invoke(mi_index, [str(data), "--model", str(FIXTURE), *common]).exit_code == 0
    removed = CliRunner().invoke(mi_index, ["--remove", str(data / "sub"), *common])
    assert removed.exit_code == 0 and "removed 3 files" in removed.output, removed.output
    updated = CliRunner().invoke(mi_index, ["--update", "--json", *common])
    assert updated.exit_code == 0, updated.output
    assert json.loads(updated.output)["new"] == 0 and json.loads(updated.output)["images"] == 3
    again = CliRunner().invoke(mi_index, [str(data / "sub"), "--json", *common])  # named again: back in
    assert again.exit_code == 0 and json.loads(again.output)["images"] == 6, again.output
    with IndexStore.open(tmp_path / "index", readonly=True) as store:
        assert store.excluded() == []


def test_remove_is_one_transaction(tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    built(folder, ["/a/x/1.dcm", "/a/x/2.dcm", "/a/y/3.dcm"])
    monkeypatch.setattr(IndexStore, "clear_removed_vectors", lambda self: None)  # a commit of its own
    with IndexStore.open(folder) as store:
        store.record_run(["/a"], 0.0)
        commits = []
        event.listen(store.engine, "commit", lambda conn: commits.append(1))
        generation = store.generation()
        assert store.remove_root("/a/x") == 2
        assert len(commits) == 1  # files, images, roots and the exclusion together: a kill leaves all or none
        assert store.generation() == generation + 1 and store.count() == 1
        assert store.excluded() == ["/a/x"] and store.roots() == ["/a"]


def test_walk_resolves_roots_and_links_not_every_file(tmp_path, monkeypatch):
    from indexer.sources import folders

    real = tmp_path / "real"
    for i in range(20):
        make_png(real / "deep" / f"{i}.png", i)
    elsewhere = tmp_path / "elsewhere"
    make_png(elsewhere / "e.png", 1)
    (real / "linked").symlink_to(elsewhere, target_is_directory=True)
    (real / "file-link.png").symlink_to(elsewhere / "e.png")
    via = tmp_path / "via"
    via.symlink_to(real, target_is_directory=True)
    expected = sorted([str(real.resolve() / "deep" / f"{i}.png") for i in range(20)]
                      + [str(elsewhere.resolve() / "e.png")] * 2)  # linked folder and file: the target's path
    calls = []
    original = os.path.realpath
    monkeypatch.setattr(folders.os.path, "realpath", lambda p, **kw: calls.append(p) or original(p, **kw))
    found = sorted(path for path, _ in folders.walk([via]))
    assert found == expected
    assert len(calls) < 6  # the root, the linked folder and the linked file; not one per file


def test_stats_are_counted_once_per_change(tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    built(folder, [f"/s/{i}.dcm" for i in range(5)])
    with Searcher(folder, model=None) as searcher:
        calls = []
        real_status = IndexStore.status
        monkeypatch.setattr(IndexStore, "status", lambda self: calls.append(1) or real_status(self))
        assert searcher.stats()["images"] == searcher.stats()["images"] == 5 and len(calls) == 1
        with IndexStore.open(folder) as store:
            store.commit(indexed=[item("/s/new.dcm", unit(np.ones((1, DIM)))[0], 9)])
        assert searcher.stats()["images"] == 6 and len(calls) == 2
        with IndexStore.open(folder) as store:
            store.record_run(["/s"], 1.5)  # a run that changed nothing still says when it ran
        assert searcher.stats()["last_run_seconds"] == 1.5 and len(calls) == 3


def test_the_writer_gets_a_large_page_cache_and_readers_do_not(tmp_path):
    from indexer.store.database import WRITER_CACHE_KIB

    built(tmp_path / "idx", ["/c/1.dcm"])
    with IndexStore.open(tmp_path / "idx") as writer, IndexStore.open(tmp_path / "idx", readonly=True) as reader:
        writer.lock()
        with writer.engine.connect() as conn, reader.engine.connect() as other:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -WRITER_CACHE_KIB
            assert other.exec_driver_sql("PRAGMA cache_size").scalar() == -2000  # SQLite's default
