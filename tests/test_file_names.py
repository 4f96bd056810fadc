"""File names that are not valid UTF-8, or carry markup and terminal escapes: indexed, found and
shown byte for byte."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import indexer
from encoders import load_model
from retrieval import Searcher

from made_images import make_images

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu")


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
