"""mi-index --ray: decoding and encoding on a real local Ray cluster (2 CPUs), compared with a
local build of the same files; a driver killed mid-run resumes without duplicates or loss."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import indexer
from indexer.store import IndexStore
from indexer.store.vector_file import STORED_ATOL
from raw_sqlite import fetch_rows, raw_db
from servers import DICOM_NAMES, FIXTURE, PYDICOM_FILES, command_env

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install ".[ray]")')


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module, its address: the indexer here connects to it (ray.init is
    idempotent), a mi-index process through RAY_ADDRESS."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def make_archive(folder: Path, count: int = 12) -> Path:
    folder.mkdir(parents=True)
    for name in DICOM_NAMES:
        shutil.copy(PYDICOM_FILES / name, folder)
    shutil.copy(PYDICOM_FILES / "MR_small.dcm", folder / "copy-of-MR.dcm")  # same content: reused
    (folder / "broken.dcm").write_bytes(b"DICM" * 10)
    rng = np.random.default_rng(3)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"rgb{i}.png")
    return folder


def rows(index: Path) -> dict[str, tuple]:
    with raw_db(index) as db, IndexStore.open(index, readonly=True) as store:
        found = {}
        for row_id, path, frame, modality, content_hash in db.execute(
                "SELECT id, path, frame, modality, content_hash FROM images"):
            found[(Path(path).name, frame)] = (modality, content_hash, store.vectors([row_id])[0])
        skipped = dict(db.execute("SELECT path, error FROM files WHERE error IS NOT NULL"))
    return found, {Path(path).name: error for path, error in skipped.items()}


def test_an_index_built_on_ray_equals_a_local_build(cluster, tmp_path):
    data = make_archive(tmp_path / "data")
    local = indexer.index_paths([data], tmp_path / "local", model=str(FIXTURE), workers=0)
    on_ray = indexer.index_paths([data], tmp_path / "ray", model=str(FIXTURE), ray="local", batch_size=4)
    assert on_ray["new"] == local["new"] == len(list(data.iterdir()))
    assert on_ray["images"] == local["images"] and on_ray["skipped"] == local["skipped"] == 1
    (local_rows, local_skipped), (ray_rows, ray_skipped) = rows(tmp_path / "local"), rows(tmp_path / "ray")
    assert local_rows.keys() == ray_rows.keys() and local_skipped == ray_skipped
    for key, (modality, content_hash, vector) in local_rows.items():
        assert ray_rows[key][:2] == (modality, content_hash)
        np.testing.assert_allclose(ray_rows[key][2], vector, atol=STORED_ATOL)
    # a re-run on Ray sends nothing to the cluster; a renamed file reuses its vectors
    (data / "rgb0.png").rename(data / "renamed.png")
    again = indexer.index_paths([data], tmp_path / "ray", model=str(FIXTURE), ray="local")
    assert (again["new"], again["removed"], again["encoded"], again["reused"]) == (1, 1, 0, 1)


def test_a_killed_driver_resumes_without_duplicates(cluster, tmp_path):
    """SIGKILL of `mi-index --ray` while it runs on the cluster at RAY_ADDRESS (the cluster lives
    on, as a shared one does); the next run (on Ray again) completes the index with every image once."""
    data = make_archive(tmp_path / "data", count=20)
    index = tmp_path / "index"
    command = [sys.executable, "-c", "from indexer.cli import entry; entry()", str(data), "--index", str(index),
               "--model", str(FIXTURE), "--ray", "--batch-size", "2"]
    env = command_env(RAY_ADDRESS=cluster)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (index / "index.sqlite").exists():
            with raw_db(index, timeout=30) as db:
                try:
                    committed = db.execute("SELECT count(*) FROM images").fetchone()[0]
                except sqlite3.OperationalError:  # the schema is not there yet
                    committed = 0
            if committed >= 6:
                break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()
    os.killpg(process.pid, signal.SIGKILL)  # the driver (and anything it started)
    process.wait()
    process.stderr.close()
    ((partial,),) = fetch_rows(index, "SELECT count(*) FROM images")
    assert 6 <= partial < 24
    resumed = subprocess.run(command + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    paths = [path for (path,) in fetch_rows(index, "SELECT path FROM images")]
    assert len(paths) == len(set(paths)) == 24  # 3 + 1 copy + 20 PNGs; the broken file skipped


def test_ray_mistakes_are_one_line(tmp_path):
    data = make_archive(tmp_path / "data", count=1)
    result = subprocess.run([sys.executable, "-c", "from indexer.cli import entry; entry()", str(data),
                             "--index", str(tmp_path / "index"), "--model", str(FIXTURE), "--ray-address",
                             "127.0.0.1:1"], env=command_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "index").exists()


def test_a_pacs_indexed_on_ray_equals_a_local_build(cluster, tmp_path):
    """The DICOMweb source travels to Ray's workers (its connection is rebuilt there, not pickled):
    the same instances, metadata and vectors as a local run from the same Orthanc."""
    from orthanc_server import MISSING, Orthanc, dicom_files, stocked
    from orthanc_server import rows as pacs_rows

    if MISSING:
        pytest.skip(MISSING)
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        uploaded = stocked(server, dicom_files(6))
        local = indexer.index_dicomweb(server.url, tmp_path / "local", model=str(FIXTURE), workers=0, batch_size=1)
        on_ray = indexer.index_dicomweb(server.url, tmp_path / "ray", model=str(FIXTURE), ray="local", batch_size=1)
    finally:
        server.stop()
    assert on_ray["new"] == local["new"] == len(uploaded) and on_ray["images"] == local["images"] > 0
    local_rows, ray_rows = pacs_rows(tmp_path / "local"), pacs_rows(tmp_path / "ray")
    assert local_rows.keys() == ray_rows.keys()
    for uid, row in local_rows.items():
        assert {k: v for k, v in ray_rows[uid].items() if k not in ("id", "embedding")} == \
            {k: v for k, v in row.items() if k not in ("id", "embedding")}
        np.testing.assert_allclose(ray_rows[uid]["embedding"],
                                   row["embedding"], atol=STORED_ATOL)
