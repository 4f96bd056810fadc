"""Defects found by an adversarial run (issue 13), each with the input that showed it: hostile
files, damaged caches, transient failures, absurd arguments."""
from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

import indexer
from encoders import load_model
from indexer.decode import DecodeError, TransientDecodeError, decode_bytes
from indexer.store import IndexStore
from retrieval import Searcher

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu")


def make_images(folder: Path, count: int, seed: int = 0, size: int = 64) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        paths.append(folder / f"img{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(paths[-1])
    return paths


def mutants(data: bytes, start: int, seed: int, count: int):
    """`count` copies of `data` with 1-7 random bytes changed at or after `start`, or cut short."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        copy = bytearray(data)
        if rng.random() < 0.2:
            yield bytes(copy[: int(rng.integers(start, len(copy)))])
            continue
        for _ in range(int(rng.integers(1, 8))):
            copy[int(rng.integers(start, len(copy)))] = int(rng.integers(0, 256))
        yield bytes(copy)


# --- decoders that panic or run out of memory ------------------------------------------------------

def _panicking_rle_file() -> bytes | None:
    """A mutated MR_small_RLE.dcm on which pylibjpeg-rle's Rust decoder panics (pyo3 raises
    PanicException, a BaseException), or None if this version of the decoder no longer does."""
    from pydicom.pixels import pixel_array

    data = (PYDICOM_FILES / "MR_small_RLE.dcm").read_bytes()
    for mutant in mutants(data, data.find(b"\xe0\x7f\x10\x00"), seed=0, count=400):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixel_array(pydicom.dcmread(io.BytesIO(mutant), force=True))
        except Exception:
            continue
        except BaseException as e:  # noqa: B036 - exactly what the decoder must survive
            if type(e).__name__ == "PanicException":
                return mutant
            raise
    return None


def test_a_rust_panic_in_a_decoder_costs_one_file(tmp_path, model, monkeypatch):
    monkeypatch.setenv("RUST_BACKTRACE", "0")
    mutant = _panicking_rle_file()
    if mutant is None:
        pytest.skip("this pylibjpeg-rle no longer panics on the mutated file")
    with pytest.raises(DecodeError):
        decode_bytes(mutant, Path("x.dcm"))
    data = tmp_path / "data"
    make_images(data, 2)
    (data / "panic.dcm").write_bytes(mutant)
    summary = indexer.index_paths([data], tmp_path / "index", model=model, workers=0)  # in this process
    assert summary["new"] == 3 and summary["images"] == 2
    assert [row["path"] for row in summary["skipped_files"]] == [str((data / "panic.dcm").resolve())]

    from retrieval.errors import QueryError
    with Searcher(tmp_path / "index", model=model) as searcher, pytest.raises(QueryError, match="cannot read"):
        searcher.search(image=data / "panic.dcm")


def test_fuzzed_dicom_files_are_indexed_or_skipped_with_a_reason(tmp_path, model, monkeypatch):
    monkeypatch.setenv("RUST_BACKTRACE", "0")
    data = tmp_path / "fuzz"
    data.mkdir()
    sources = ["MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "CT_small.dcm", "MR_small.dcm"]
    for name in sources:
        original = (PYDICOM_FILES / name).read_bytes()
        for i, mutant in enumerate(mutants(original, 132, seed=len(name), count=12)):
            (data / f"{Path(name).stem}_{i:02d}.dcm").write_bytes(mutant)
    summary = indexer.index_paths([data], tmp_path / "index", model=model, workers=0)
    assert summary["new"] == len(sources) * 12
    skipped = {row["path"]: row["reason"] for row in summary["skipped_files"]}
    assert all(reason.strip() for reason in skipped.values())
    with IndexStore.open(tmp_path / "index", readonly=True) as store:
        indexed = {path for path, in sqlite3.connect(store.folder / "index.sqlite").execute(
            "SELECT DISTINCT path FROM images")}
    assert indexed | set(skipped) == {str(p.resolve()) for p in data.iterdir()} and not indexed & set(skipped)


def test_a_transient_failure_is_retried_on_the_next_run(tmp_path, model, monkeypatch):
    data = tmp_path / "data"
    make_images(data, 3)
    import indexer.run.workers as pipeline
    real = pipeline.decode_bytes

    def out_of_memory_for_img001(data_bytes, path, **kwargs):
        if path.name == "img001.png":
            raise TransientDecodeError("out of memory while decoding (tried again next run)")
        return real(data_bytes, path, **kwargs)
    monkeypatch.setattr(pipeline, "decode_bytes", out_of_memory_for_img001)
    first = indexer.index_paths([data], tmp_path / "index", model=model, workers=0)
    assert first["images"] == 2 and len(first["skipped_files"]) == 1
    monkeypatch.undo()
    second = indexer.index_paths([data], tmp_path / "index", model=model, workers=0)  # the file is unchanged
    assert second["images"] == 3 and second["updated"] == 1 and second["unchanged"] == 2


def test_max_megapixels_is_the_one_guard_for_pillow_formats(tmp_path):
    big = Image.new("L", (10_000, 9_500))  # 95 MP: above Pillow's own 89.5 MP bomb guard
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    decoded = decode_bytes(buffer.getvalue(), Path("big.png"), max_megapixels=100)
    assert decoded.frames[0][1].size == (10_000, 9_500)
    with pytest.raises(DecodeError, match="max-megapixels 50"):
        decode_bytes(buffer.getvalue(), Path("big.png"), max_megapixels=50)


def test_a_fifo_given_directly_is_skipped_not_waited_for(tmp_path, model):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    data = tmp_path / "data"
    make_images(data, 1)
    summary = indexer.index_paths([fifo, data], tmp_path / "index", model=model, workers=0)
    assert summary["images"] == 1
    assert summary["skipped_files"] == [{"path": str(fifo), "reason": "not a regular file (a FIFO, device or socket)"}]


# --- the FAISS cache is tied to its database --------------------------------------------------------

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


# --- file names: not valid UTF-8, markup, terminal escapes -------------------------------------------

def test_a_file_name_that_is_not_utf8_is_indexed_and_found_byte_for_byte(tmp_path, model):
    from click.testing import CliRunner

    from retrieval.cli import main as mi_search

    data = tmp_path / "data"
    make_images(data, 2)
    odd = data / os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 and a stray byte: legal on Linux
    Image.fromarray(np.full((64, 64), 77, np.uint8)).save(odd)
    index_dir = tmp_path / "index"
    first = indexer.index_paths([data], index_dir, model=model, workers=1)
    assert first["new"] == 3 and first["images"] == 3 and not first["skipped_files"]
    again = indexer.index_paths([data], index_dir, model=model, workers=0)
    assert again["unchanged"] == 3 and again["new"] == 0  # found again under the same name

    result = CliRunner().invoke(mi_search, [str(odd), "--index", str(index_dir), "-k", "1", "--paths"])
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == os.fsencode(str(odd.resolve())) + b"\n"
    result = CliRunner().invoke(mi_search, [str(odd), "--index", str(index_dir), "-k", "3", "--print0"])
    assert result.stdout_bytes.split(b"\0")[0] == os.fsencode(str(odd.resolve()))
    with Searcher(index_dir, model=model) as searcher:
        assert len(searcher.search("x", k=5, under=data)) == 3  # the folder filter sees it too

    odd.unlink()
    removed = indexer.index_paths([data], index_dir, model=model, workers=0)
    assert removed["removed"] == 1 and removed["images"] == 2


HOSTILE = ["a[/x]b.png", "[bold red]x.png", "e\x1b[2Jvil.png", "t\x1b]0;pwned\x07.png"]  # a[/ is a folder


def test_hostile_file_names_are_shown_as_they_are(tmp_path, model):
    from click.testing import CliRunner
    from rich.console import Console

    from indexer.cli import main as mi_index
    from retrieval.cli import _print_table

    data = tmp_path / "data"
    data.mkdir()
    (data / "a[").mkdir()
    (data / "broken" "a[").mkdir()
    for i, name in enumerate(HOSTILE):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(data / name, "PNG")
        (data / ("broken" + name)).write_bytes(b"\x89PNG\r\n\x1a\n broken")  # in the skip table
    index_dir = tmp_path / "index"
    result = CliRunner().invoke(mi_index, [str(data), "--index", str(index_dir), "--model", str(FIXTURE),
                                           "--workers", "0"], env={"COLUMNS": "500"})  # paths on one line
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "brokena[/x]b.png" in result.output
    assert "broken[bold red]x.png" in result.output and "\\x1b[2J" in result.output

    with Searcher(index_dir, model=model) as searcher:
        hits = searcher.search("x", k=4)
    buffer = io.StringIO()
    _print_table(hits, Console(file=buffer, width=200, force_terminal=True, color_system=None))
    shown = buffer.getvalue()
    assert "\x1b" not in shown and "\x07" not in shown
    assert "a[/x]b.png" in shown and "[bold red]x.png" in shown
    assert "e\\x1b[2Jvil.png" in shown and "t\\x1b]0;pwned\\x07.png" in shown


# --- storage that fails: a full disk, a damaged database, a read-only index ------------------------

def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


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
    message = _one_line_error(CliRunner().invoke(mi_index, args))
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
    sqlite3.connect(db).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()  # every page in the file itself
    raw = bytearray(db.read_bytes())
    page = 4096
    for offset in range(page, len(raw), page):  # every page but the first: headers and cells
        raw[offset:offset + 64] = os.urandom(64)
    db.write_bytes(bytes(raw))
    (data / "new.png").write_bytes((data / "img000.png").read_bytes()[:-1] + b"\1")
    for result in (CliRunner().invoke(mi_search, ["x", "--index", str(index_dir)]), CliRunner().invoke(mi_index, args)):
        message = _one_line_error(result)
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
    sqlite3.connect(index_dir / "index.sqlite").execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    for leftover in index_dir.glob("index.sqlite-*"):  # as a copied or archived index has no -wal/-shm
        leftover.unlink()
    read_only = read_only_view(index_dir)

    found = CliRunner().invoke(mi_search, [str(data / "img002.png"), "--index", str(read_only), "-k", "1", "--paths"])
    assert found.exit_code == 0, found.output
    assert found.output.strip() == str((data / "img002.png").resolve())
    message = _one_line_error(CliRunner().invoke(mi_index, [str(data), "--index", str(read_only), "--model",
                                                            str(FIXTURE)]))
    assert "is read-only (a read-only file system)" in message


# --- patient pseudonyms: keyed, the key outside the index --------------------------------------------

def test_patient_pseudonyms_are_keyed_with_a_key_outside_the_index(tmp_path, model, monkeypatch):
    from click.testing import CliRunner

    from indexer.cli import main as mi_index
    from indexer.privacy import pseudonym

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", data)
    key_file = tmp_path / "team.key"
    key_file.write_text("0123456789abcdef" * 4)
    monkeypatch.setenv("MI_PATIENT_KEY_FILE", str(key_file))
    index_dir = tmp_path / "index"
    indexer.index_paths([data], index_dir, model=model, workers=0)
    db = sqlite3.connect(index_dir / "index.sqlite")
    meta = dict(db.execute("SELECT key, value FROM meta"))
    assert "patient_salt" not in meta
    patient_id = str(pydicom.dcmread(data / "CT_small.dcm", stop_before_pixels=True).PatientID)
    (stored,) = db.execute("SELECT patient_hash FROM images").fetchone()
    assert stored == pseudonym(patient_id, key_file.read_bytes().strip())
    assert key_file.read_bytes().strip() not in (index_dir / "index.sqlite").read_bytes()

    other = tmp_path / "other.key"
    other.write_text("fedcba9876543210" * 4)
    monkeypatch.setenv("MI_PATIENT_KEY_FILE", str(other))
    (data / "copy.dcm").write_bytes((data / "CT_small.dcm").read_bytes() + b"\0\0")
    message = _one_line_error(CliRunner().invoke(mi_index, [str(data), "--index", str(index_dir), "--model",
                                                            str(FIXTURE), "--workers", "0"]))
    assert "another key" in message and "MI_PATIENT_KEY_FILE" in message


def test_an_index_with_salted_hashes_is_migrated_to_keyed_pseudonyms(tmp_path):
    from sqlalchemy import create_engine, text

    from indexer.store import schema as schema_module
    from indexer.store import database as store_module
    from indexer.privacy import patient_key, pseudonym

    index_dir = tmp_path / "old"
    index_dir.mkdir()
    engine = create_engine(f"sqlite:///{index_dir / 'index.sqlite'}")
    with engine.begin() as conn:  # an index as version 1 of the schema wrote it
        schema_module._m001_initial(conn)
        conn.execute(text("INSERT INTO meta VALUES ('schema_version', '1')"))
        conn.execute(text("INSERT INTO files VALUES ('/a.dcm', 1, 1, 'h', NULL, 'now')"))
        conn.execute(text("INSERT INTO images (path, frame, content_hash, patient_hash, embedding) "
                          "VALUES ('/a.dcm', 0, 'h', 'salted-hash-of-patient-1', x'0000803f')"))
    engine.dispose()
    with IndexStore.open(index_dir, create=True) as store:
        assert store.rows([1])[1]["patient_hash"] == pseudonym("salted-hash-of-patient-1", patient_key())
    meta = dict(sqlite3.connect(index_dir / "index.sqlite").execute("SELECT key, value FROM meta"))
    assert "patient_salt" not in meta and meta["schema_version"] == str(store_module.SCHEMA_VERSION)


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
