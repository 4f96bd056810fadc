"""mi-index's command line, run in process: a path that is not there or holds no images is one line and
leaves no index folder; the sample indexed and searched; an index looked at, updated, pruned and rebuilt
with another model (--status, --update, --remove, --folders-of); the skip list capped in the summary;
and the same commands under `mi`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli_checks import one_line_failure
from indexer.cli import main as mi_index
from other_model import FIXTURE, model_with_other_weights
from retrieval.cli import main as mi_search


def test_a_missing_path_leaves_no_index_folder(tmp_path):
    index_dir = tmp_path / "nested" / "index"
    message = one_line_failure(CliRunner().invoke(mi_index, [str(tmp_path / "xrays"), "--index", str(index_dir),
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
    message = one_line_failure(CliRunner().invoke(mi_index, [str(target), "--index", str(index_dir),
                                                            "--model", str(FIXTURE), "--workers", "0"]))
    assert "no images found" in message and "PNG, JPEG, TIFF, BMP and DICOM" in message
    assert not index_dir.exists()


def test_sample_then_search_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))  # where the sample is copied
    index_dir = tmp_path / "index"
    result = CliRunner().invoke(mi_index, ["--sample", "--index", str(index_dir), "--model", str(FIXTURE),
                                           "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["images"] >= 6 and not summary["skipped_files"]
    sample = tmp_path / "data-home" / "medimageinsight-search" / "sample"
    copied = {path.resolve() for path in sample.iterdir()}  # real files the index points at, one image each
    assert len(copied) == summary["new"] == summary["images"]
    found = CliRunner().invoke(mi_search, ["chest x-ray", "--index", str(index_dir), "--json", "-k", "3"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)
    assert len(hits) == 3 and all(Path(hit["path"]).resolve() in copied for hit in hits)


def test_status_update_remove_and_rebuild_with_another_model(tmp_path):
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
    refused = one_line_failure(CliRunner().invoke(mi_index, [str(a), "--model", str(other), *common]))
    advice = f"mi-index --folders-of {index_dir.resolve()} --index NEW_INDEX --model {other}"
    assert advice in refused
    rebuilt = CliRunner().invoke(mi_index, ["--folders-of", str(index_dir), "--index", str(tmp_path / "new"),
                                            "--model", str(other), "--workers", "0", "--json"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads(rebuilt.output)["images"] == 4


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


def test_the_mi_group_runs_both_commands(tmp_path):
    from retrieval.commands import mi

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "a.png")
    index = ["--index", str(tmp_path / "i")]
    indexed = CliRunner().invoke(mi, ["index", str(data), *index, "--model", str(FIXTURE), "--workers", "0"])
    assert indexed.exit_code == 0, indexed.output
    found = CliRunner().invoke(mi, ["search", "x", *index, "--json"])
    assert found.exit_code == 0, found.output
    assert [Path(hit["path"]) for hit in json.loads(found.stdout)] == [(data / "a.png").resolve()]
