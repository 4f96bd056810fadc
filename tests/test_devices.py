"""Devices and batches: the device names there are (`encoders.defaults`), checked by the command lines
before anything loads (PyTorch included) and by the library in the same words; CUDA asked for without a
GPU; the batch per kind of device, one default for the encoder and mi-index, and its cap."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli_checks import one_line_failure, usage_failure
from indexer.cli import main as mi_index
from retrieval.cli import main as mi_search

REPO = Path(__file__).parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "medimageinsight-tiny"
NOT_DEVICES = ["gpu", "cuda:x", "tpu"]


@pytest.fixture(scope="module")
def model():
    from encoders import load_model

    return load_model(FIXTURE, device="cpu", towers=("image",))


def one_png(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "a.png")
    return data


@pytest.mark.parametrize("device", NOT_DEVICES)
def test_a_bad_device_is_refused_before_anything_loads(tmp_path, device):
    data = one_png(tmp_path)
    expected = f"'{device}' is not a device: use cpu, cuda or cuda:N"
    message = usage_failure(CliRunner().invoke(mi_index, [str(data), "--index", str(tmp_path / "i"),
                                                          "--device", device]))
    assert expected in message
    assert not (tmp_path / "i").exists()
    message = usage_failure(CliRunner().invoke(mi_search, ["x", "--index", str(tmp_path / "i"), "--device", device]))
    assert expected in message


@pytest.mark.parametrize("device", NOT_DEVICES)
def test_the_library_refuses_a_bad_device_in_the_command_lines_words(device):
    from encoders import ModelError
    from encoders.inference import resolve_device

    with pytest.raises(ModelError) as caught:
        resolve_device(device)
    assert str(caught.value) == f"'{device}' is not a device: use cpu, cuda or cuda:N"


def test_the_device_is_checked_and_a_run_settled_without_importing_pytorch():
    """What a command line does before it knows it must encode (an unchanged re-run never does) costs
    no PyTorch: the device check and the run's defaults come from a module that does not import it."""
    code = ("import sys; from indexer.terminal import check_device; from indexer.options import IndexOptions, settle; "
            "assert check_device(None, None, ' CUDA:1 ') == 'cuda:1'; "
            "assert settle(IndexOptions(), 'cuda', 10).batch_size == 64; "
            "print(sorted(m for m in ('torch', 'encoders.checkpoint', 'encoders.inference') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cuda_asked_for_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    data = one_png(tmp_path)
    message = one_line_failure(CliRunner().invoke(mi_index, [str(data), "--index", str(tmp_path / "i"), "--model",
                                                             str(FIXTURE), "--device", "cuda", "--workers", "0"]))
    assert "no CUDA GPU" in message and "--device cpu" in message and not (tmp_path / "i").exists()


@pytest.mark.parametrize("device_type, images", [("cuda", 130), ("cpu", 5)])
def test_encode_images_batches_as_mi_index_does(model, monkeypatch, device_type, images):
    """One default batch per kind of device: `encode_images` cuts a list as mi-index's run does (the
    CUDA batch was 32 in one and 64 in the other). The encoding itself is left out, so that the CUDA
    case needs no GPU."""
    import torch

    from indexer.options import IndexOptions, settle

    sizes = []
    monkeypatch.setattr(model, "device", torch.device(device_type))
    monkeypatch.setattr(model, "encode_resized",
                        lambda resized: sizes.append(len(resized)) or np.zeros((len(resized), model.dim), np.float32))
    vectors = model.encode_images([np.zeros((8, 8), np.uint8)] * images)
    batch = settle(IndexOptions(), device_type, images).batch_size
    assert vectors.shape == (images, model.dim)
    assert sizes == [batch] * (images // batch) + ([images % batch] if images % batch else [])
    assert batch == {"cuda": 64, "cpu": 2}[device_type]


def test_an_absurd_batch_size_is_capped_and_commits_stay_frequent(tmp_path, monkeypatch, model):
    import indexer
    import indexer.options as options
    from indexer.store import IndexStore

    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        Image.fromarray(np.full((16, 16), i * 20, np.uint8)).save(data / f"{i}.png")
    monkeypatch.setattr(options, "MAX_BATCH_SIZE", 4)
    batches, commits = [], []
    real_start = model.start_encoding
    monkeypatch.setattr(model, "start_encoding", lambda resized: batches.append(len(resized)) or real_start(resized))
    real_commit = IndexStore.commit

    def commit(self, indexed=(), *args, **kwargs):
        commits.append(len(indexed))  # files whose images this transaction writes
        return real_commit(self, indexed, *args, **kwargs)

    monkeypatch.setattr(IndexStore, "commit", commit)
    summary = indexer.index_paths([data], tmp_path / "index", model=model, batch_size=100_000, workers=0)
    assert summary["images"] == 12 and batches == [4, 4, 4]
    # each batch is committed as it is done: no transaction holds more than one batch, none is lost
    assert max(commits) == 4 and sum(commits) == 12
