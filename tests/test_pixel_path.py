"""Pixels travel small (issue 8): decoding workers hand over 8-bit images at the model's size,
collated as uint8 and normalised where the model runs; the tensors and embeddings are exactly
those of `preprocess()`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import load_model
from indexer.store import IndexStore
from indexer.store.vector_file import STORED_ATOL

from raw_sqlite import raw_db

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu", towers=("image",))


def images() -> list:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (300, 200), dtype=np.uint8)),            # grey
            Image.fromarray(rng.integers(0, 256, (64, 90, 3), dtype=np.uint8)),           # colour
            rng.integers(0, 4096, (700, 500)).astype(np.uint16),                           # 12-bit array
            Image.fromarray(rng.integers(0, 256, (480, 480), dtype=np.uint8))]             # already 480


def test_resize_collate_normalize_equals_preprocess_bit_for_bit(model):
    pre = model.preprocess
    resized = [pre.resize(image) for image in images()]
    assert [r.dtype for r in resized] == [np.uint8] * 4
    assert resized[0].shape == (480, 480) and resized[1].shape == (480, 480, 3)  # grey stays one channel
    batch = pre.normalize(pre.collate(resized))
    expected = torch.stack([pre(image) for image in images()])
    assert batch.dtype == torch.float32 and torch.equal(batch, expected)


def test_encode_resized_equals_encode_pixels(model):
    """The same batch through either path is the same computation: equal bit for bit. Other
    batches (encode_images' default of 2 on the CPU) sum in another order inside the GEMMs, which
    moves the last bits differently on each CPU's kernels: equal within float32 rounding."""
    resized = [model.preprocess.resize(image) for image in images()]
    via_uint8 = model.encode_resized(resized)
    via_float = model.encode_pixels(torch.stack([model.preprocess(image) for image in images()]))
    np.testing.assert_array_equal(via_uint8, via_float)
    np.testing.assert_array_equal(model.encode_images(images(), batch_size=len(resized)), via_float)
    np.testing.assert_allclose(model.encode_images(images()), via_float, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned, non-blocking copies)")
def test_on_cuda_the_batch_is_pinned_and_normalised_on_the_device():
    gpu = load_model(FIXTURE, device="cuda", dtype="float32", towers=("image",))
    resized = [gpu.preprocess.resize(image) for image in images()]
    batch = gpu.preprocess.collate(resized, pin=True)
    assert batch.is_pinned()
    on_device = gpu.preprocess.normalize(batch.to("cuda", non_blocking=True))
    torch.testing.assert_close(on_device.cpu(), gpu.preprocess.normalize(batch), rtol=0, atol=1e-6)
    cpu = load_model(FIXTURE, device="cpu", towers=("image",))
    np.testing.assert_allclose(gpu.encode_resized(resized), cpu.encode_resized(resized), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (batches queued without waiting)")
def test_on_cuda_two_batches_in_flight_each_come_back_whole():
    gpu = load_model(FIXTURE, device="cuda", dtype="float32", towers=("image",))
    cpu = load_model(FIXTURE, device="cpu", towers=("image",))
    resized = [gpu.preprocess.resize(image) for image in images()]
    first, second = gpu.start_encoding(resized), gpu.start_encoding(resized[::-1])
    np.testing.assert_allclose(second.result(), cpu.encode_resized(resized[::-1]), atol=1e-4)
    np.testing.assert_allclose(first.result(), cpu.encode_resized(resized), atol=1e-4)


def test_bf16_on_a_cpu_without_native_bf16_warns_in_one_line(tmp_path, caplog):
    from encoders.inference import cpu_lacks_native

    without, with_amx = tmp_path / "without", tmp_path / "with"
    without.write_text("flags\t\t: fpu sse sse2 avx avx2 fma\n")
    with_amx.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    assert cpu_lacks_native(torch.bfloat16, str(without)) and not cpu_lacks_native(torch.bfloat16, str(with_amx))
    assert not cpu_lacks_native(torch.bfloat16, str(tmp_path / "no-such-file"))  # cannot tell: no warning
    import logging
    with caplog.at_level(logging.WARNING, logger="encoders.inference"):
        load_model(FIXTURE, device="cpu", dtype="bfloat16", towers=("image",))
    warned = [r.getMessage() for r in caplog.records if r.name == "encoders.inference"]
    assert bool(warned) == cpu_lacks_native(torch.bfloat16)  # this machine's own answer
    assert all("\n" not in message and "--dtype float32" in message for message in warned)


def test_compile_is_chosen_for_long_cuda_runs_or_when_asked():
    from indexer.options import COMPILE_MIN_IMAGES, IndexOptions, compile_wanted

    assert compile_wanted("auto", "cuda", COMPILE_MIN_IMAGES) and not compile_wanted("auto", "cuda", 1000)
    assert not compile_wanted("auto", "cpu", 10 ** 7)
    assert compile_wanted("on", "cpu", 1) and not compile_wanted("off", "cuda", 10 ** 7)
    with pytest.raises(ValueError, match="compile must be one of"):
        IndexOptions(compile="always")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.compile of the image tower)")
def test_the_compiled_encoder_matches_eager_on_every_row(tmp_path):
    gpu = load_model(FIXTURE, device="cuda", towers=("image",))
    resized = [gpu.preprocess.resize(image) for image in images()] * 4
    eager = gpu.encode_resized(resized)
    gpu.compile(cache_dir=tmp_path / "inductor")
    compiled = gpu.encode_resized(resized)
    cosine = (eager * compiled).sum(1) / np.linalg.norm(eager, axis=1) / np.linalg.norm(compiled, axis=1)
    assert cosine.min() >= 0.9999


def test_a_compiler_that_fails_leaves_the_encoder_eager_with_one_line(model, tmp_path, monkeypatch, caplog):
    """Inductor's CPU kernels need a C++ compiler: where there is none, --compile on says so in
    one line and encodes eagerly, with the same embeddings."""
    import logging

    import torch._dynamo
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing compiled before
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-c++")))
    resized = [model.preprocess.resize(image) for image in images()]
    eager = model.encode_resized(resized)
    fresh = load_model(FIXTURE, device="cpu", towers=("image",))
    fresh.compile()
    try:
        with caplog.at_level(logging.WARNING, logger="encoders.inference"):
            first, again = fresh.encode_resized(resized), fresh.encode_resized(resized)
    finally:
        torch._dynamo.reset()
    np.testing.assert_array_equal(first, eager)
    np.testing.assert_array_equal(again, eager)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "encoders.inference"]
    assert message.startswith("torch.compile failed") and "C++ compiler" in message and "\n" not in message


def test_the_next_batch_starts_before_the_previous_one_is_committed(model, tmp_path, monkeypatch):
    """The overlap that keeps a GPU busy: batch k+1 is queued on the device before batch k's
    embeddings are taken and committed, and the index still holds exactly each file's embedding."""
    import indexer

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(4)
    pictures = [rng.integers(0, 256, (40, 30), dtype=np.uint8) for _ in range(10)]
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(data / f"{i:02d}.png")
    events: list[tuple[str, int]] = []
    real_start, real_commit = model.start_encoding, IndexStore.commit

    class Logged:
        def __init__(self, pending, number):
            self.pending, self.number = pending, number

        def result(self):
            events.append(("result", self.number))
            return self.pending.result()

    def start_encoding(resized):
        number = sum(kind == "start" for kind, _ in events)
        events.append(("start", number))
        return Logged(real_start(resized), number)

    def commit(self, indexed=(), skipped=(), removed=()):
        if indexed:
            events.append(("commit", len(indexed)))
        return real_commit(self, indexed, skipped, removed)

    monkeypatch.setattr(model, "start_encoding", start_encoding)
    monkeypatch.setattr(IndexStore, "commit", commit)
    summary = indexer.index_paths([data], tmp_path / "index", model=model, batch_size=4, workers=0)
    assert summary["encoded"] == 10
    assert events == [("start", 0), ("start", 1), ("result", 0), ("commit", 4),
                      ("start", 2), ("result", 1), ("commit", 4), ("result", 2), ("commit", 2)]
    with raw_db(tmp_path / "index") as db, \
            IndexStore.open(tmp_path / "index", readonly=True) as store:
        by_name = {Path(path).name: store.vectors([row_id])[0]
                   for row_id, path in db.execute("SELECT id, path FROM images")}
    expected = model.encode_images(pictures)
    for i in range(10):
        np.testing.assert_allclose(by_name[f"{i:02d}.png"], expected[i], atol=STORED_ATOL)
