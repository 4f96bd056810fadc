"""A decoder that panics, fuzzed DICOM headers, transient failures, absurd sizes, special files:
each costs one file, with its reason, never the run."""
from __future__ import annotations

import io
import os
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

from made_images import make_images
from raw_sqlite import fetch_rows

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu")


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
        indexed = {path for path, in fetch_rows(store.folder, "SELECT DISTINCT path FROM images")}
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
