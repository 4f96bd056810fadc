"""The vectors' own file (indexer.store.vector_file): float16 scores within 1e-3 of float32, an image
scoring 1.0 against itself, removed rows zeroed on disk (also after a kill between the commit and
the clearing), a transaction killed after writing vectors leaving nothing visible, the migration
from vectors in SQLite rows, and a damaged file refused in one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.errors import IndexDamagedError, one_line
from indexer.store import IndexStore
from indexer.store import series as series_module
from indexer.store.vector_file import FILE_NAME, STORED_ATOL, VectorFile, id_runs

from old_index import as_schema_7
from raw_sqlite import fetch_rows, raw_db

DIM = 1024
FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def items(prefix: str, vectors: np.ndarray) -> list[dict]:
    return [{"path": f"/data/{prefix}/{i}.dcm", "size": 1, "mtime_ns": 1, "content_hash": f"{prefix}{i}",
             "images": [{"frame": 0, "embedding": vector, "modality": "CR"}]} for i, vector in enumerate(vectors)]


def ids_under(store: IndexStore, prefix: str) -> list[int]:
    with store.engine.connect() as conn:
        return [row[0] for row in conn.exec_driver_sql(
            "SELECT id FROM images WHERE path LIKE ? ORDER BY id", (f"/data/{prefix}/%",))]


def raw_rows(folder: Path, ids: list[int]) -> np.ndarray:
    """The bytes on disk of rows `ids`, as float16, without the reader's renormalising."""
    data = np.fromfile(folder / FILE_NAME, dtype="<f2", offset=64)
    return data.reshape(-1, DIM)[ids]


def test_stored_scores_are_within_1e_3_of_float32_and_an_image_scores_1_against_itself(tmp_path):
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((200, DIM)) + 3 * rng.standard_normal(DIM))  # near one another
    with IndexStore.open(tmp_path / "idx", create=True) as store:
        store.commit(indexed=items("a", vectors))
        stored = store.vectors(ids_under(store, "a"))
    queries = unit(rng.standard_normal((20, DIM)))
    assert np.abs(queries @ stored.T - queries @ vectors.T).max() < 1e-3
    assert np.abs(vectors @ stored.T - vectors @ vectors.T).max() < 1e-3
    np.testing.assert_allclose(np.einsum("nd,nd->n", vectors, stored), 1.0, atol=1e-6)
    np.testing.assert_allclose(stored, vectors, atol=STORED_ATOL)
    assert (tmp_path / "idx" / FILE_NAME).stat().st_size == 64 + (200 + 1) * DIM * 2  # row 0 unused


def test_removed_rows_are_zeroed_on_disk(tmp_path):
    rng = np.random.default_rng(1)
    with IndexStore.open(tmp_path / "idx", create=True) as store:
        store.lock()
        store.commit(indexed=items("keep", unit(rng.standard_normal((30, DIM)))))
        store.commit(indexed=items("gone", unit(rng.standard_normal((40, DIM)))))
        kept, gone = ids_under(store, "keep"), ids_under(store, "gone")
        before = store.vectors(kept)
        assert np.abs(raw_rows(tmp_path / "idx", gone)).sum() > 0
        store.remove_roots(["/data/gone"])
        assert not raw_rows(tmp_path / "idx", gone).any()
        np.testing.assert_array_equal(store.vectors(kept), before)
        # a file indexed again: its old row's vector goes too
        store.commit(indexed=items("keep", unit(rng.standard_normal((1, DIM)))))
        assert not raw_rows(tmp_path / "idx", kept[:1]).any()
        with pytest.raises(KeyError):
            store.vectors(gone[:1])


def test_a_kill_between_the_commit_and_the_clearing_is_finished_by_the_next_writer(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    with IndexStore.open(tmp_path / "idx", create=True) as store:
        store.lock()
        store.commit(indexed=items("gone", unit(rng.standard_normal((10, DIM)))))
        gone = ids_under(store, "gone")
        monkeypatch.setattr(VectorFile, "clear", lambda self, runs: (_ for _ in ()).throw(SystemExit("killed")))
        with pytest.raises(SystemExit):
            store.remove_roots(["/data/gone"])
        monkeypatch.undo()
        assert ids_under(store, "gone") == [] and raw_rows(tmp_path / "idx", gone).any()
    with IndexStore.open(tmp_path / "idx") as store:
        store.lock()
        assert not raw_rows(tmp_path / "idx", gone).any()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM meta WHERE key = 'vectors_to_clear'").scalar() == 0


def test_a_transaction_killed_after_writing_its_vectors_leaves_nothing_visible(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    first, second = unit(rng.standard_normal((5, DIM))), unit(rng.standard_normal((5, DIM)))
    with IndexStore.open(tmp_path / "idx", create=True) as store:
        store.lock()
        store.commit(indexed=items("a", unit(rng.standard_normal((3, DIM)))))

        def killed(*args):
            raise SystemExit("killed after the vectors were written")
        monkeypatch.setattr("indexer.store.writes.refresh_series", killed)
        with pytest.raises(SystemExit):
            store.commit(indexed=items("b", first))
        monkeypatch.undo()
        assert ids_under(store, "b") == [] and store.count() == 3
        store.commit(indexed=items("b", second))  # the same ids again, its own vectors
        assert ids_under(store, "b") == [4, 5, 6, 7, 8]
        np.testing.assert_allclose(store.vectors(ids_under(store, "b")), second, atol=STORED_ATOL)


def database_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("index.sqlite*"))


def test_an_index_with_vectors_in_sqlite_rows_is_migrated(tmp_path):
    rng = np.random.default_rng(4)
    vectors = unit(rng.standard_normal((300, DIM)))
    folder = tmp_path / "idx"
    with IndexStore.open(folder, create=True) as store:
        store.commit(indexed=items("a", vectors))
        store.remove_roots(["/data/a/7.dcm"])
        ids = ids_under(store, "a")
        stored = store.vectors(ids)
    as_schema_7(folder)
    assert not (folder / FILE_NAME).exists()
    old_size = database_size(folder)
    # another connection open meanwhile (a notebook, an old server) must not put off giving the
    # pages back: SQLite folds the WAL in at the last close only
    with raw_db(folder, readonly=True) as reader, IndexStore.open(folder) as store:
        reader.execute("SELECT count(*) FROM images").fetchall()
        np.testing.assert_array_equal(store.vectors(ids), stored)
        assert store.status()["schema_version"] == 8
        index, _ = store.load_faiss_with_generation()
        assert index.ntotal == 299
        assert database_size(folder) < old_size / 5  # the vectors' pages given back
    columns = [row[1] for row in fetch_rows(folder, "PRAGMA table_info(images)")]
    assert "embedding" not in columns
    assert database_size(folder) < old_size / 5  # the vectors' pages given back


def test_a_cut_short_vector_file_is_one_clear_line(tmp_path):
    with IndexStore.open(tmp_path / "idx", create=True) as store:
        store.commit(indexed=items("a", unit(np.random.default_rng(5).standard_normal((4, DIM)))))
    path = tmp_path / "idx" / FILE_NAME
    path.write_bytes(path.read_bytes()[:64 + 2 * DIM * 2])
    with IndexStore.open(tmp_path / "idx", readonly=True) as store:
        with pytest.raises(IndexDamagedError) as error:
            store.vectors([4])
    assert "\n" not in one_line(error.value) and "mi-index" in one_line(error.value)


def test_id_runs():
    assert id_runs([9, 3, 4, 5, 7, 8, 1]) == [(1, 1), (3, 5), (7, 9)]
    assert id_runs([]) == []


def test_series_vectors_are_read_from_the_file(tmp_path):
    rng = np.random.default_rng(6)
    slices = unit(rng.standard_normal((6, DIM)))
    rows = [{"path": f"/ct/{i}.dcm", "size": 1, "mtime_ns": 1, "content_hash": f"c{i}",
             "images": [{"frame": 0, "embedding": v, "modality": "CT", "series_instance_uid": "1.2.3"}]}
            for i, v in enumerate(slices)]
    with IndexStore.open(tmp_path / "idx", create=True) as store:
        store.commit(indexed=rows)
        (_, _, _, count, _), = store.series()[0]
        assert count == 6
        np.testing.assert_allclose(store.series()[1][0], series_module.series_vector(slices), atol=1e-3)


def test_mi_index_update_upgrades_an_index_of_the_older_schema(tmp_path):
    from click.testing import CliRunner

    from indexer.cli import main as mi_index
    from made_images import make_images

    make_images(tmp_path / "data", 3)
    common = ["--index", str(tmp_path / "index"), "--model", str(FIXTURE), "--workers", "0"]
    assert CliRunner().invoke(mi_index, [str(tmp_path / "data"), *common]).exit_code == 0
    as_schema_7(tmp_path / "index")
    updated = CliRunner().invoke(mi_index, ["--update", "--json", *common])  # it read the roots read-only: refused
    assert updated.exit_code == 0, updated.output
    with IndexStore.open(tmp_path / "index", readonly=True) as store:
        assert store.status()["schema_version"] == 8 and store.count() == 3


def test_rows_are_read_in_any_order_near_or_scattered_and_a_cut_short_file_is_refused(tmp_path):
    """A run of rows (a FAISS build, a scan) is one read; scattered ones (re-ranking, a training sample) a
    read per run of neighbours: the same vectors either way, in the asked order, removed rows zero."""
    vectors = unit(np.random.default_rng(8).standard_normal((3000, 64)))
    stored = VectorFile(tmp_path)
    stored.write(np.arange(3000), vectors)
    stored.clear([(100, 199)])
    on_disk = np.fromfile(stored.path, dtype="<f2", offset=64).reshape(-1, 64).astype(np.float32)
    expected = on_disk / np.maximum(np.linalg.norm(on_disk, axis=1, keepdims=True), 1e-30)
    rng = np.random.default_rng(9)
    for ids in (rng.permutation(np.arange(50, 2950)),           # near one another: one read
                rng.choice(3000, size=40, replace=False),        # scattered, unsorted
                np.array([2999, 5, 5, 2999, 6]),                 # repeated, neighbours
                np.arange(0, 3000, 97)):                         # evenly spread
        stored.prefetch(ids)  # the kernel asked to fetch them first (as re-ranking does): the same rows after
        read = stored.read(ids)
        np.testing.assert_array_equal(read, expected[ids])
        np.testing.assert_array_equal(stored.read(ids, prefetched=True), read)  # not asked for again: the same
        live = ids[(ids < 100) | (ids >= 200)]
        np.testing.assert_allclose(stored.read(live), vectors[live], atol=STORED_ATOL)
    assert not stored.read(np.arange(100, 200)).any()
    VectorFile(tmp_path / "none").prefetch(np.arange(0, 6400, 100))  # no file yet (64 runs): nothing to fetch
    assert stored.read([]).shape == (0, 64)
    with open(stored.path, "r+b") as f:
        f.truncate(64 + 2500 * 64 * 2)
    for ids in (np.arange(1000, 2900), np.array([3, 2600])):
        with pytest.raises(IndexDamagedError, match="cut short"):
            VectorFile(tmp_path).read(ids)


def test_reads_and_writes_beneath_sqlalchemy_fail_as_one_line_naming_the_index(tmp_path):
    from indexer.errors import IndexReadOnlyError, StoreError
    from indexer.store.database import execute_many_raw, fetch_raw

    with IndexStore.open(tmp_path / "idx", create=True) as store:
        store.commit(indexed=items("a", unit(np.random.default_rng(6).standard_normal((2, DIM)))))
    with IndexStore.open(tmp_path / "idx", readonly=True) as store:
        with pytest.raises(StoreError) as error:
            fetch_raw(store.engine, "SELECT nothing FROM nowhere")
        assert str(tmp_path / "idx") in one_line(error.value)
        with store.engine.connect() as conn, pytest.raises(IndexReadOnlyError) as error:
            execute_many_raw(conn, "INSERT INTO meta VALUES (:k, :v)", [{"k": "x", "v": "y"}])
        assert str(tmp_path / "idx") in one_line(error.value) and "\n" not in one_line(error.value)
        with pytest.raises(IndexReadOnlyError) as error:  # its first write is a raw DELETE ... RETURNING
            store.remove_roots(["/data/a"])
        assert str(tmp_path / "idx") in one_line(error.value)
    with IndexStore.open(tmp_path / "idx", readonly=True) as store:
        assert len(ids_under(store, "a")) == 2  # nothing removed
