"""Storage that fails: a full disk, a damaged database page, a read-only index: one line each,
and the index resumes."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from encoders import load_model
from indexer.store import IndexStore

from cli_checks import one_line_failure
from made_images import make_images
from raw_sqlite import fetch_rows

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu")


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB file system (tmpfs), so that a full disk is the kernel's ENOSPC, not a mock."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_index_resumes(tmp_path, small_disk):
    from click.testing import CliRunner

    from indexer.cli import main as mi_index

    data = tmp_path / "data"
    make_images(data, 40)
    index_dir = small_disk / "index"
    args = [str(data), "--index", str(index_dir), "--model", str(FIXTURE), "--workers", "0", "--batch-size", "4"]
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 40_960))  # room to start, not to finish
    message = one_line_failure(CliRunner().invoke(mi_index, args))
    assert "is full" in message and "free some space" in message

    filler.unlink()
    result = CliRunner().invoke(mi_index, args + ["--json"])
    assert result.exit_code == 0, result.output
    import json
    assert json.loads(result.output)["images"] == 40
    with IndexStore.open(index_dir, readonly=True) as store:
        assert store.count() == 40 and store.load_faiss_with_generation()[0].ntotal == 40


def test_a_damaged_database_page_is_one_line(tmp_path):
    from click.testing import CliRunner

    from indexer.cli import main as mi_index
    from retrieval.cli import main as mi_search

    data = tmp_path / "data"
    make_images(data, 30)
    index_dir = tmp_path / "index"
    args = [str(data), "--index", str(index_dir), "--model", str(FIXTURE), "--workers", "0"]
    assert CliRunner().invoke(mi_index, args).exit_code == 0
    db = index_dir / "index.sqlite"
    fetch_rows(db, "PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file itself
    raw = bytearray(db.read_bytes())
    page = 4096
    for offset in range(page, len(raw), page):  # every page but the first: headers and cells
        raw[offset:offset + 64] = os.urandom(64)
    db.write_bytes(bytes(raw))
    (data / "new.png").write_bytes((data / "img000.png").read_bytes()[:-1] + b"\1")
    for result in (CliRunner().invoke(mi_search, ["x", "--index", str(index_dir)]), CliRunner().invoke(mi_index, args)):
        message = one_line_failure(result)
        assert "is damaged" in message and "move the folder away" in message


@pytest.fixture
def read_only_view(tmp_path):
    """`view(folder)`: the folder mounted again read-only (a read-only file system, as a DVD,
    a read-only share or a snapshot is), so that even root cannot write there."""
    mounts = []

    def view(folder: Path) -> Path:
        target = tmp_path / f"ro-{len(mounts)}"
        target.mkdir()
        for command in (["mount", "--bind", str(folder), str(target)],
                        ["mount", "-o", "remount,bind,ro", str(target)]):
            done = subprocess.run(command, capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"cannot make a read-only mount here: {done.stderr.decode().strip()}")
            mounts.append(target)
        return target
    yield view
    for target in reversed(mounts):
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_read_only_index_is_searched_and_writing_is_refused_in_one_line(tmp_path, read_only_view):
    from click.testing import CliRunner

    from indexer.cli import main as mi_index
    from retrieval.cli import main as mi_search

    data, index_dir = tmp_path / "data", tmp_path / "index"
    make_images(data, 5)
    assert CliRunner().invoke(mi_index, [str(data), "--index", str(index_dir), "--model", str(FIXTURE),
                                         "--workers", "0"]).exit_code == 0
    fetch_rows(index_dir, "PRAGMA wal_checkpoint(TRUNCATE)")
    for leftover in index_dir.glob("index.sqlite-*"):  # as a copied or archived index has no -wal/-shm
        leftover.unlink()
    read_only = read_only_view(index_dir)

    found = CliRunner().invoke(mi_search, [str(data / "img002.png"), "--index", str(read_only), "-k", "1", "--paths"])
    assert found.exit_code == 0, found.output
    assert found.output.strip() == str((data / "img002.png").resolve())
    message = one_line_failure(CliRunner().invoke(mi_index, [str(data), "--index", str(read_only), "--model",
                                                            str(FIXTURE)]))
    assert "is read-only (a read-only file system)" in message
