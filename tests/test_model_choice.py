"""Which model a command uses, and what it says when there is none: --model before MI_MODEL before
the index's model before the default; a folder or a Hugging Face id, and the download advice; another
model's index refused alike by mi-index and the Searcher."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from other_model import FIXTURE, model_with_other_weights


def test_the_model_named_comes_before_mi_model_before_the_index_s(tmp_path, monkeypatch):
    from encoders.checkpoint import resolve_model_source
    from indexer.model_choice import chosen_model_source, named_model_source

    monkeypatch.setenv("MI_MODEL", "from-env")
    assert chosen_model_source("given", "recorded") == "given" and named_model_source("given") == "given"
    assert chosen_model_source(tmp_path, "recorded") == str(tmp_path)  # a path, as text
    assert chosen_model_source(None, "recorded") == "from-env" and named_model_source("") == "from-env"
    monkeypatch.setenv("MI_MODEL", "")  # empty is unset
    assert chosen_model_source(None, "recorded") == "recorded" and named_model_source(None) is None
    assert chosen_model_source("", "") is None  # the encoder's default
    monkeypatch.setenv("MI_MODEL", str(FIXTURE))  # and the encoder, given nothing, reads the same variable
    assert resolve_model_source(None) == FIXTURE
    assert resolve_model_source("") == FIXTURE


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


def test_the_default_model_s_message_does_not_talk_about_folders_the_user_never_named(monkeypatch, tmp_path):
    from encoders import ModelNotFoundError
    from encoders.checkpoint import resolve_model_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MI_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_source(None)
    assert "no local folder" not in str(caught.value) and "hf download" in str(caught.value)


def test_a_relative_owner_name_folder_is_a_folder_and_the_download_top_folder_works(tmp_path, monkeypatch):
    from encoders.checkpoint import resolve_model_source

    download = tmp_path / "lion-ai" / "MedImageInsights"  # as `hf download ... --local-dir` leaves it
    shutil.copytree(FIXTURE, download / "2024.09.27")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("lion-ai/MedImageInsights") == Path("lion-ai/MedImageInsights/2024.09.27")


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
