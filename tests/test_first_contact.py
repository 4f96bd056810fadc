"""What a new user meets first (issue 9): mistyped arguments, empty folders, a missing model.
Each is one readable line with a non-zero exit, and a failed first run leaves no index behind."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from indexer.cli import main as mi_index
from retrieval.cli import main as mi_search

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"


def one_line_error(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_a_bad_device_is_refused_before_anything_loads(tmp_path, device):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "a.png")
    message = one_line_error(CliRunner().invoke(mi_index, [str(data), "--index", str(tmp_path / "i"),
                                                          "--device", device]), exit_code=2)
    assert f"'{device}' is not a device: use cpu, cuda or cuda:N" in message
    assert not (tmp_path / "i").exists()
    message = one_line_error(CliRunner().invoke(mi_search, ["x", "--index", str(tmp_path / "i"), "--device", device]),
                             exit_code=2)
    assert "is not a device" in message


def test_the_library_refuses_a_bad_device_in_one_line():
    from encoders import ModelError
    from encoders.inference import resolve_device

    with pytest.raises(ModelError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_a_missing_path_leaves_no_index_folder(tmp_path):
    index_dir = tmp_path / "nested" / "index"
    message = one_line_error(CliRunner().invoke(mi_index, [str(tmp_path / "xrays"), "--index", str(index_dir),
                                                          "--model", str(FIXTURE)]))
    assert "no such file or folder" in message and not (tmp_path / "nested").exists()


@pytest.mark.parametrize("what", ["empty folder", "non-images", "a text file"])
def test_no_images_found_says_what_is_read_and_leaves_nothing(tmp_path, what):
    data = tmp_path / "data"
    data.mkdir()
    target = data
    if what == "non-images":
        (data / "notes.txt").write_text("hello")
        (data / "table.csv").write_text("a,b")
    elif what == "a text file":
        target = data / "notes.txt"
        target.write_text("hello")
    index_dir = tmp_path / "index"
    message = one_line_error(CliRunner().invoke(mi_index, [str(target), "--index", str(index_dir),
                                                          "--model", str(FIXTURE), "--workers", "0"]))
    assert "no images found" in message and "PNG, JPEG, TIFF, BMP and DICOM" in message
    assert not index_dir.exists()


def test_the_weights_message_names_the_current_download_command(tmp_path, monkeypatch):
    from encoders import ModelNotFoundError
    from encoders.checkpoint import resolve_model_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_source("someone/some-model")
    message = str(caught.value)
    assert "hf download lion-ai/MedImageInsights --local-dir" in message and "2024.09.27" in message
    assert "no local folder" in message and "hf-hub:someone/some-model" in message  # both were tried
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_source("hf-hub:someone/some-model")
    assert "no local folder" not in str(caught.value)


def test_a_relative_owner_name_folder_is_a_folder_and_the_download_top_folder_works(tmp_path, monkeypatch):
    import shutil

    from encoders.checkpoint import resolve_model_source

    download = tmp_path / "lion-ai" / "MedImageInsights"  # as `hf download ... --local-dir` leaves it
    shutil.copytree(FIXTURE, download / "2024.09.27")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("lion-ai/MedImageInsights") == Path("lion-ai/MedImageInsights/2024.09.27")
