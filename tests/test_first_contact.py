"""What a new user meets first (issue 9): mistyped arguments, empty folders, a missing model.
Each is one readable line with a non-zero exit, and a failed first run leaves no index behind."""
from __future__ import annotations

import shutil
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

    with pytest.raises(ModelError, match="'gpu' is not a device: use cpu, cuda or cuda:N"):
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

    from encoders.checkpoint import resolve_model_source

    download = tmp_path / "lion-ai" / "MedImageInsights"  # as `hf download ... --local-dir` leaves it
    shutil.copytree(FIXTURE, download / "2024.09.27")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("lion-ai/MedImageInsights") == Path("lion-ai/MedImageInsights/2024.09.27")


# --- the sample, and managing an index ------------------------------------------------------------------

def test_sample_then_search_runs_end_to_end(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))  # where the sample is copied
    index_dir = tmp_path / "index"
    result = CliRunner().invoke(mi_index, ["--sample", "--index", str(index_dir), "--model", str(FIXTURE),
                                           "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["images"] >= 6 and not summary["skipped_files"]
    sample = tmp_path / "data-home" / "medimageinsight-search" / "sample"
    assert sorted(p.name for p in sample.iterdir())  # real files the index points at
    found = CliRunner().invoke(mi_search, ["chest x-ray", "--index", str(index_dir), "--json", "-k", "3"])
    assert found.exit_code == 0, found.output
    assert all(str(sample) in hit["path"] for hit in json.loads(found.stdout))


def test_status_update_remove_and_rebuild_with_another_model(tmp_path):
    import json

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, n in ((a, 3), (b, 2)):
        folder.mkdir()
        for i in range(n):
            Image.fromarray(np.full((16, 16), 30 * i + n, np.uint8)).save(folder / f"{i}.png")
    (b / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    index_dir = tmp_path / "index"
    common = ["--index", str(index_dir), "--workers", "0"]
    assert CliRunner().invoke(mi_index, [str(a), str(b), "--model", str(FIXTURE), *common]).exit_code == 0

    status = json.loads(CliRunner().invoke(mi_index, ["--status", "--json", *common]).output)
    assert status["images"] == 5 and status["files"] == 5 and sum(status["skipped"].values()) == 1
    assert status["folders"] == sorted([str(a.resolve()), str(b.resolve())])
    assert status["model"]["dim"] and status["size_bytes"] > 0 and status["last_run_at"]
    shown = CliRunner().invoke(mi_index, ["--status", *common], env={"COLUMNS": "300"})
    assert shown.exit_code == 0 and str(a.resolve()) in shown.output and "5 from 5 files" in shown.output

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(a / "new.png")
    updated = CliRunner().invoke(mi_index, ["--update", "--json", *common])  # no folders named
    assert updated.exit_code == 0, updated.output
    assert json.loads(updated.output)["new"] == 1 and json.loads(updated.output)["images"] == 6

    removed = CliRunner().invoke(mi_index, ["--remove", str(b), *common])
    assert removed.exit_code == 0 and "removed 3 files" in removed.output  # 2 images and the broken file
    status = json.loads(CliRunner().invoke(mi_index, ["--status", "--json", *common]).output)
    assert status["images"] == 4 and status["folders"] == [str(a.resolve())] and not status["skipped"]

    other = model_with_other_weights(tmp_path)
    refused = one_line_error(CliRunner().invoke(mi_index, [str(a), "--model", str(other), *common]))
    advice = f"mi-index --folders-of {index_dir.resolve()} --index NEW_INDEX --model {other}"
    assert advice in refused
    rebuilt = CliRunner().invoke(mi_index, ["--folders-of", str(index_dir), "--index", str(tmp_path / "new"),
                                            "--model", str(other), "--workers", "0", "--json"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads(rebuilt.output)["images"] == 4


def model_with_other_weights(tmp_path: Path) -> Path:
    """The same network with other weights: another fingerprint."""
    other = tmp_path / "other-model"
    shutil.copytree(FIXTURE, other)
    checkpoint = next((other / "vision_model").glob("*.pt"))
    raw = bytearray(checkpoint.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # the first tensor's bytes: always in the fingerprint
    raw[start:start + 64] = bytes(64)
    checkpoint.write_bytes(bytes(raw))
    return other


def test_one_model_mismatch_error_for_both_commands(tmp_path):
    """Indexing and searching with a model other than the index's are refused alike: one error
    class that the retrieval API exports, with the same advice."""
    import indexer
    from retrieval import ModelMismatchError, Searcher

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / "a.png")
    index_dir = tmp_path / "index"
    indexer.index_paths([data], index_dir, model=str(FIXTURE), workers=0)
    other = model_with_other_weights(tmp_path)
    with pytest.raises(ModelMismatchError) as indexing:
        indexer.index_paths([data], index_dir, model=str(other), workers=0)
    with pytest.raises(ModelMismatchError) as searching:
        with Searcher(index_dir, model=str(other)) as searcher:
            searcher.search("chest")
    advice = f"--folders-of {index_dir.resolve()} --index NEW_INDEX --model {other}"
    assert advice in str(indexing.value) and advice in str(searching.value)


def test_the_skip_list_is_capped_in_the_human_summary(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "ok.png")
    for i in range(30):
        (data / f"broken{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = CliRunner().invoke(mi_index, [str(data), "--index", str(tmp_path / "i"), "--model", str(FIXTURE),
                                           "--workers", "0"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) < 35 and "... and 25 more" in result.output


def test_an_absurd_batch_size_is_capped_and_commits_stay_frequent(tmp_path, monkeypatch):
    import indexer
    import indexer.options as pipeline
    from encoders import load_model
    from indexer.store import IndexStore

    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        Image.fromarray(np.full((16, 16), i * 20, np.uint8)).save(data / f"{i}.png")
    monkeypatch.setattr(pipeline, "MAX_BATCH_SIZE", 4)
    batches, commits = [], []
    model = load_model(FIXTURE, device="cpu", towers=("image",))
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


def test_cuda_asked_for_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "a.png")
    message = one_line_error(CliRunner().invoke(mi_index, [str(data), "--index", str(tmp_path / "i"), "--model",
                                                          str(FIXTURE), "--device", "cuda", "--workers", "0"]))
    assert "no CUDA GPU" in message and "--device cpu" in message and not (tmp_path / "i").exists()


def test_the_mi_group_runs_both_commands(tmp_path):
    import json

    from retrieval.commands import mi

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "a.png")
    index = ["--index", str(tmp_path / "i")]
    assert CliRunner().invoke(mi, ["index", str(data), *index, "--model", str(FIXTURE), "--workers", "0"]).exit_code == 0
    found = CliRunner().invoke(mi, ["search", "x", *index, "--json"])
    assert found.exit_code == 0 and len(json.loads(found.stdout)) == 1


def test_the_default_model_s_message_does_not_talk_about_folders_the_user_never_named(monkeypatch, tmp_path):
    from encoders import ModelNotFoundError
    from encoders.checkpoint import resolve_model_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MI_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_source(None)
    assert "no local folder" not in str(caught.value) and "hf download" in str(caught.value)
