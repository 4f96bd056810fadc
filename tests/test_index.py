"""mi-index: incremental updates, crash safety, concurrent readers, and its CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image

import indexer
from encoders import load_model
from indexer.cli import main as mi_index
from indexer.store import IndexStore
from indexer.store.vector_file import STORED_ATOL

from raw_sqlite import fetch_rows

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu", towers=("image",))


def make_images(folder: Path, count: int, seed: int = 0, size: int = 96) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def index_state(index_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    """{(path, frame): vector} from SQLite, after checking FAISS and SQLite agree."""
    with IndexStore.open(index_dir, readonly=True) as store:
        rows = fetch_rows(index_dir, "SELECT id, path, frame FROM images")
        stored = store.vectors([row_id for row_id, *_ in rows])
        rows = [(*row, vector) for row, vector in zip(rows, stored)]
        assert len({(p, f) for _, p, f, _ in rows}) == len(rows), "duplicate images"
        index = store.load_faiss_with_generation()[0]
        assert index.ntotal == len(rows)
        assert set(faiss.vector_to_array(index.id_map).tolist()) == {row_id for row_id, *_ in rows}
        for row_id, _, _, vector in rows:
            np.testing.assert_array_equal(index.reconstruct(row_id), vector)
        cached = list(index_dir.glob("vectors.*"))
        assert len(cached) == 1 and cached[0].name == f"vectors.{store.index_id}.g{store.generation()}.faiss"
        assert faiss.read_index(str(cached[0])).ntotal == len(rows)
        return {(p, f): e for _, p, f, e in rows}


def test_incremental_runs(tmp_path, model):
    data, index_dir = tmp_path / "data", tmp_path / "index"
    images = make_images(data, 6)
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", data / "ct.dcm")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "notes.txt").write_text("not ours")

    first = indexer.index_paths([data], index_dir, model=model, workers=0)
    assert (first["new"], first["encoded"], first["skipped"], first["images"]) == (8, 7, 1, 7)
    assert first["skipped_files"][0]["path"].endswith("broken.png")

    again = indexer.index_paths([data], index_dir, model=model, workers=0)
    assert again["encoded"] == 0 and again["unchanged"] == 8 and again["new"] == again["skipped"] == 0
    assert again["still_skipped"] == 1

    # a modified file is encoded again; a deleted one is gone; a renamed and a copied one are not encoded
    Image.fromarray(np.full((50, 70), 200, np.uint8)).save(images[0])
    images[1].unlink()
    images[2].rename(data / "renamed.png")
    shutil.copy(images[3], data / "copy.png")
    before = index_state(index_dir)
    third = indexer.index_paths([data], index_dir, model=model, workers=0)
    assert (third["updated"], third["removed"], third["new"], third["encoded"], third["reused"]) == (1, 2, 2, 1, 2)
    after = index_state(index_dir)
    paths = {path for path, _ in after}
    assert str(images[1]) not in paths and str(images[2]) not in paths
    np.testing.assert_array_equal(after[(str(data / "renamed.png"), 0)], before[(str(images[2]), 0)])
    np.testing.assert_array_equal(after[(str(data / "copy.png"), 0)], before[(str(images[3]), 0)])
    assert not np.array_equal(after[(str(images[0]), 0)], before[(str(images[0]), 0)])
    fresh = model.encode_images([Image.open(images[0])])[0]
    np.testing.assert_allclose(after[(str(images[0]), 0)], fresh, atol=STORED_ATOL)

    # the broken file is retried only once it changes
    assert indexer.index_paths([data], index_dir, model=model, workers=0)["skipped"] == 0
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "broken.png")
    fixed = indexer.index_paths([data], index_dir, model=model, workers=0)
    assert fixed["updated"] == 1 and fixed["encoded"] == 1 and fixed["skipped"] == 0


def test_migration_killed_halfway_leaves_nothing_behind(tmp_path, monkeypatch):
    import indexer.store.schema as schema_module
    import indexer.store.database as store_module

    def broken_migration(conn):
        conn.execute(store_module.text("CREATE TABLE half_done (x)"))
        raise store_module.OperationalError("killed", {}, Exception("killed"))
    monkeypatch.setattr(store_module, "MIGRATIONS", [schema_module._m001_initial, broken_migration])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    with pytest.raises(store_module.IndexFormatError):
        IndexStore.open(tmp_path / "index", create=True)
    tables = fetch_rows(tmp_path / "index", "SELECT name FROM sqlite_master WHERE type = 'table'")
    assert tables == []  # rolled back: the next open starts from scratch
    monkeypatch.undo()
    with IndexStore.open(tmp_path / "index", create=True) as store:
        assert store.count() == 0 and store.model_info is None


@pytest.mark.parametrize("flat_max", [50_000, 50])  # an exact index, and an IVF one above 50 rows
def test_faiss_cache_is_brought_up_to_date_from_sqlite(tmp_path, monkeypatch, flat_max):
    import indexer.store.vectors as vector_index
    monkeypatch.setattr(vector_index, "FLAT_MAX_VECTORS", flat_max)
    rng = np.random.default_rng(0)

    def files(names):
        vectors = rng.normal(size=(len(names), 16)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return [{"path": f"/data/{name}", "size": 1, "mtime_ns": 1, "content_hash": name,
                 "images": [{"frame": 0, "embedding": vector}]} for name, vector in zip(names, vectors)]
    with IndexStore.open(tmp_path / "index", create=True) as store:
        store.commit(indexed=files([f"a{i}" for i in range(120)]))
        first = store.write_faiss()
        builds = []
        real_build = vector_index.build_faiss_index
        monkeypatch.setattr(vector_index, "build_faiss_index", lambda *a, **k: builds.append(1) or real_build(*a, **k))
        store.commit(indexed=files([f"b{i}" for i in range(30)]), removed=[f"/data/a{i}" for i in range(10)])
        index = store.load_faiss_with_generation()[0]  # the older file plus the difference, not a rebuild
        second = store.write_faiss()
        assert second != first and not first.exists() and builds == []
        row_ids = [row_id for row_id, in fetch_rows(tmp_path / "index", "SELECT id FROM images")]
        stored = dict(zip(row_ids, store.vectors(row_ids)))
        for loaded in (index, faiss.read_index(str(second))):
            assert loaded.ntotal == len(stored) == 140
            assert vector_index.index_kind(loaded) == ("flat" if flat_max > 140 else "ivf")
            ids = sorted(stored)
            _, found = vector_index.search(loaded, np.stack([stored[i] for i in ids]), 1)
            assert (found[:, 0] == ids).mean() > 0.9  # each vector finds itself (IVF: approximately)
            assert set(vector_index.search(loaded, stored[ids[-1]], 200)[1][0]) - {-1} == set(ids)


def test_deleted_file_leaves_search_results(tmp_path, model):
    from retrieval import Searcher
    data, index_dir = tmp_path / "data", tmp_path / "index"
    images = make_images(data, 3)
    indexer.index_paths([data], index_dir, model=model, workers=0)
    query = model.encode_images([Image.open(images[1])])[0]
    with Searcher(index_dir, model=model) as searcher:
        assert searcher.search(vector=query, k=1)[0].path == str(images[1])
    images[1].unlink()
    indexer.index_paths([data], index_dir, model=model, workers=0)
    with Searcher(index_dir, model=model) as searcher:
        assert str(images[1]) not in [hit.path for hit in searcher.search(vector=query, k=10)]


def test_walk_rules(tmp_path, model):
    data = tmp_path / "data"
    make_images(data / "a", 2)
    make_images(data / ".hidden", 2, seed=1)
    (data / "a" / "loop").symlink_to(data, target_is_directory=True)  # a symlink loop
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", data / "a" / "IM0001")  # DICOM without extension
    index_dir = data / "index-inside"  # the index folder itself is not indexed
    summary = indexer.index_paths([data, data / "a" / "img000.png"], index_dir, model=model, workers=0)
    assert summary["new"] == 3 and summary["images"] == 3 and summary["skipped"] == 0


def test_a_decoder_crash_costs_one_file_not_the_run(tmp_path, model, monkeypatch):
    import indexer.run.workers as pipeline
    real_decode = pipeline.decode_bytes

    def decode_or_crash(data, path, **kwargs):  # runs in the (forked) worker processes
        if path.name == "img002.png":
            os.kill(os.getpid(), signal.SIGSEGV)
        return real_decode(data, path, **kwargs)
    monkeypatch.setattr(pipeline, "decode_bytes", decode_or_crash)
    make_images(tmp_path / "data", 6)
    summary = indexer.index_paths([tmp_path / "data"], tmp_path / "index", model=model, workers=2, batch_size=2)
    assert summary["images"] == 5 and summary["skipped"] == 1
    assert summary["skipped_files"][0]["path"].endswith("img002.png")
    assert "crashed" in summary["skipped_files"][0]["reason"]
    assert len(index_state(tmp_path / "index")) == 5


def test_symlinked_folder_outside_the_root_is_unchanged_on_rerun(tmp_path, model):
    outside, data = tmp_path / "outside", tmp_path / "data"
    make_images(outside, 2)
    make_images(data, 1, seed=3)
    (data / "linked").symlink_to(outside, target_is_directory=True)
    first = indexer.index_paths([data], tmp_path / "index", model=model, workers=0)
    assert first["new"] == 3 and first["images"] == 3
    again = indexer.index_paths([data], tmp_path / "index", model=model, workers=0)
    assert (again["unchanged"], again["new"], again["encoded"], again["images"]) == (3, 0, 0, 3)


def test_unreadable_folder_is_not_taken_for_deleted(tmp_path, model, monkeypatch):
    data = tmp_path / "data"
    make_images(data / "a", 2)
    make_images(data / "b", 2, seed=1)
    indexer.index_paths([data], tmp_path / "index", model=model, workers=0)

    def refused(real):  # root reads everything, so a permission error is simulated (listing or opening "b")
        def call(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and Path(path).name == "b":
                raise PermissionError(13, "Permission denied")
            return real(path, *args, **kwargs)
        return call
    monkeypatch.setattr(os, "scandir", refused(os.scandir))
    monkeypatch.setattr(os, "open", refused(os.open))
    summary = indexer.index_paths([data], tmp_path / "index", model=model, workers=0)
    assert summary["removed"] == 0 and summary["images"] == 4


def test_progress_callback_counts_files(tmp_path, model):
    make_images(tmp_path / "data", 3)
    calls = []
    indexer.index_paths([tmp_path / "data"], tmp_path / "index", model=model, workers=0,
                        progress=lambda done, total, encoded: calls.append((done, total)))
    assert calls[-1] == (3, 3) and [done for done, _ in calls] == [1, 2, 3]
    make_images(tmp_path / "more", 1)
    from rich.console import Console

    from indexer.terminal import ProgressBar
    with ProgressBar(Console(stderr=True), enabled=True) as bar:  # mi-index's bar is one such callable
        assert indexer.index_paths([tmp_path / "more"], tmp_path / "index", model=model, workers=0,
                                   progress=bar)["new"] == 1


def test_workers_and_multiframe(tmp_path, model):
    data = tmp_path / "data"
    make_images(data, 3)
    shutil.copy(PYDICOM_FILES.parent.parent.parent / "data_store" / "data" / "emri_small.dcm"
                if (PYDICOM_FILES.parent.parent.parent / "data_store").exists() else PYDICOM_FILES / "CT_small.dcm",
                data / "multi.dcm")
    n_frames = int(pydicom.dcmread(data / "multi.dcm", stop_before_pixels=True).get("NumberOfFrames") or 1)
    summary = indexer.index_paths([data], tmp_path / "index", model=model, workers=2, batch_size=4, frames="all")
    assert summary["images"] == 3 + n_frames and summary["encoded"] == 3 + n_frames
    state = index_state(tmp_path / "index")
    assert sorted(f for p, f in state if p.endswith("multi.dcm")) == list(range(n_frames))
    # frames encoded in batches equal frames encoded alone
    image = pydicom.dcmread(data / "multi.dcm")
    assert len(state) == 3 + n_frames and image is not None


def test_patient_identifiers_are_not_stored(tmp_path, model):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", data / "ct.dcm")
    indexer.index_paths([data], tmp_path / "index", model=model, workers=0)
    ds = pydicom.dcmread(data / "ct.dcm", stop_before_pixels=True)
    raw = (tmp_path / "index" / "index.sqlite").read_bytes()
    for wal in (tmp_path / "index").glob("index.sqlite-wal"):
        raw += wal.read_bytes()
    for identifier in (str(ds.PatientName), str(ds.PatientID), str(ds.get("PatientBirthDate", ""))):
        if identifier:
            assert identifier.encode() not in raw
    with IndexStore.open(tmp_path / "index", readonly=True) as store:
        row = next(iter(store.rows([1]).values()))
    assert row["modality"] == "CT" and row["patient_hash"] and len(row["patient_hash"]) == 32


# --- crash safety and concurrency, with real subprocesses -----------------------------------------

def start_indexer(data: Path, index_dir: Path, *extra: str) -> subprocess.Popen:
    # One thread: two OpenMP threads competing with the test process for 2 cores spin-wait badly.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MI_MODEL": str(FIXTURE), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", "from indexer.cli import main; main()", str(data),
                             "--index", str(index_dir), "--device", "cpu", "--json", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def committed_files(index_dir: Path) -> int:
    try:
        return fetch_rows(index_dir, "SELECT count(*) FROM files", readonly=True)[0][0]
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="module")
def twenty_four(tmp_path_factory, model):
    """24 images and their clean build (in this process, as mi-index builds it): the folder the
    killed runs index too, so that their rows have the same paths. Read only."""
    root = tmp_path_factory.mktemp("twenty-four")
    make_images(root / "data", 24, size=64)
    indexer.index_paths([root / "data"], root / "clean", model=model)
    return root / "data", index_state(root / "clean")


@pytest.mark.parametrize("kill_after", [1, 8])
def test_sigkill_mid_run_then_rerun_equals_clean_build(tmp_path, twenty_four, kill_after):
    data, rebuilt = twenty_four
    index_dir = tmp_path / "index"
    process = start_indexer(data, index_dir, "--batch-size", "2", "--workers", "0")
    deadline = time.time() + 120
    while committed_files(index_dir) < kill_after and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = committed_files(index_dir)
    assert 0 < interrupted < 24, "the kill should land mid-run"

    rerun = start_indexer(data, index_dir)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["new"] == 24 - interrupted and summary["unchanged"] == interrupted

    resumed = index_state(index_dir)
    assert resumed.keys() == rebuilt.keys() and len(resumed) == 24
    for key in rebuilt:
        np.testing.assert_allclose(resumed[key], rebuilt[key], atol=STORED_ATOL)


def test_sigkill_of_the_main_process_releases_the_index_with_worker_processes(tmp_path):
    """SIGKILL reaches only mi-index's main process (the OOM killer, `kill -9 PID`): its decoding
    workers must not live on holding the writer's lock, and the next run must resume."""
    data = tmp_path / "data"
    make_images(data, 40, size=64)
    index_dir = tmp_path / "index"
    process = start_indexer(data, index_dir, "--batch-size", "2", "--workers", "2")
    deadline = time.time() + 120
    while committed_files(index_dir) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                                  text=True).stdout.split()]
    os.kill(process.pid, signal.SIGKILL)  # the main process only, not its process group
    process.wait()
    assert workers, "the run should have had decoding workers when it was killed"
    deadline = time.time() + 30
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "decoding workers outlived the killed indexer"

    rerun = start_indexer(data, index_dir, "--workers", "2")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()
    assert json.loads(out)["images"] == 40
    assert len(index_state(index_dir)) == 40


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.parametrize("name", ["idx#1", "idx?1", "idx%41", "a?b#c%20d"])
def test_index_folder_names_with_uri_characters(tmp_path, model, name):
    data = tmp_path / "data"
    make_images(data, 3)
    index_dir = tmp_path / "sp" / name
    summary = indexer.index_paths([data], index_dir, model=model, workers=0)
    assert summary["new"] == 3 and summary["images"] == 3 and not summary["skipped_files"]
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == [name]  # nothing written beside it
    assert (index_dir / "index.sqlite").exists()
    again = indexer.index_paths([data], index_dir, model=model, workers=1)  # the workers' read-only connection
    assert again["unchanged"] == 3 and again["images"] == 3
    assert len(index_state(index_dir)) == 3


def test_search_while_indexing_sees_a_consistent_index(tmp_path):
    data = tmp_path / "data"
    make_images(data, 20, size=64)
    index_dir = tmp_path / "index"
    process = start_indexer(data, index_dir, "--batch-size", "2", "--workers", "0")
    while committed_files(index_dir) == 0 and process.poll() is None:
        time.sleep(0.01)
    looks = 0
    while process.poll() is None or looks == 0:
        with IndexStore.open(index_dir, readonly=True) as store:
            index = store.load_faiss_with_generation()[0]
            ids = faiss.vector_to_array(index.id_map)
            rows = store.rows(ids.tolist())
            assert len(rows) == len(ids) == index.ntotal  # every vector has its row, no more, no less
            if len(ids):
                _, found = index.search(store.vectors(ids[:1].tolist()), 1)
                assert found[0, 0] == ids[0]
        looks += 1
        time.sleep(0.05)
    assert process.returncode == 0 and looks >= 2


def test_second_indexer_is_refused_while_one_runs(tmp_path):
    data = tmp_path / "data"
    make_images(data, 2)
    with IndexStore.open(tmp_path / "index", create=True) as running:
        running.lock()  # as a running mi-index holds it
        result = CliRunner().invoke(mi_index, [str(data), "--index", str(tmp_path / "index"), "--model", str(FIXTURE)])
    assert result.exit_code == 1 and "another mi-index is writing" in result.output
    assert CliRunner().invoke(mi_index, [str(data), "--index", str(tmp_path / "index"), "--model", str(FIXTURE),
                                         "--workers", "0"]).exit_code == 0  # released with the process


# --- the CLI ---------------------------------------------------------------------------------------

def test_cli_json_summary_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MI_MODEL", raising=False)
    data = tmp_path / "data"
    make_images(data, 2)
    runner = CliRunner()
    ok = runner.invoke(mi_index, [str(data), "--index", str(tmp_path / "index"), "--model", str(FIXTURE),
                                  "--json", "--workers", "0"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.output)
    assert all(isinstance(summary[key], int) for key in ("new", "updated", "unchanged", "removed", "skipped"))
    assert summary["new"] == 2

    def one_line_error(args: list[str], expected: str) -> None:
        result = runner.invoke(mi_index, args)
        assert result.exit_code == 1, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1

    one_line_error([str(tmp_path / "missing"), "--index", str(tmp_path / "index"), "--model", str(FIXTURE)],
                   "no such file or folder")
    other = shutil.copytree(FIXTURE, tmp_path / "other-model", ignore=shutil.ignore_patterns("expected"))
    from safetensors.torch import load_file, save_file
    weights = load_file(other / "vision_model" / "medimageinsigt-v1.0.0.pt")
    weights = {name: tensor * 1.5 for name, tensor in weights.items()}  # same layout, other weights
    save_file(weights, other / "vision_model" / "medimageinsigt-v1.0.0.pt")
    one_line_error([str(data), "--index", str(tmp_path / "index"), "--model", str(other)], "built with another model")
    one_line_error([str(data), "--index", str(tmp_path / "index2"), "--model", str(tmp_path / "nowhere")],
                   "no model folder")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "index.sqlite").write_bytes(b"this is not a database" * 100)
    one_line_error([str(data), "--index", str(tmp_path / "garbage"), "--model", str(FIXTURE)], "is damaged (file is not a database)")
    one_line_error([str(data), "--index", str(tmp_path / "index3")], "cannot get model 'lion-ai/MedImageInsights'")
