"""`mi-index DIR --watch`, a real subprocess with the tiny model: files copied in, renamed,
deleted and written slowly show up in a Searcher opened before them (it answers from the newest
generation), each within a bounded wait; SIGTERM and SIGINT end the watch cleanly."""
from __future__ import annotations

import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raw_sqlite import fetch_rows
from servers import FIXTURE, PYDICOM_FILES, command_env

pytest.importorskip("watchfiles")

WAIT = 90  # seconds a change may take to show up (a loaded 2-core machine, the first pass loads torch)


class Watcher:
    """A running `mi-index DIR --watch --json`: its passes (one JSON object a line) as they come."""

    def __init__(self, folder: Path, index: Path):
        self.index = index
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from indexer.cli import main; main()", str(folder), "--index", str(index),
             "--model", str(FIXTURE), "--workers", "0", "--watch", "--json"],
            env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.passes: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.passes.put(json.loads(line))

    def next_pass(self) -> dict:
        try:
            done = self.passes.get(timeout=WAIT)
        except queue.Empty:
            self.stop()
            raise AssertionError(f"no pass within {WAIT} s: {self.process.stderr.read()}") from None
        self.seen.append(done)
        return done

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        return code, self.process.stderr.read()


def rows(index: Path) -> dict[str, str]:
    """path -> content hash of the index's image rows, read as any other reader would."""
    return dict(fetch_rows(index, "SELECT path, content_hash FROM images", readonly=True))


def until(condition, what: str, watcher: Watcher) -> None:
    """Wait (bounded) until `condition()` holds, taking the watcher's passes as they come."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline or watcher.process.poll() is not None:
            code, err = watcher.stop()
            raise AssertionError(f"{what}: not seen within {WAIT} s (exit {code}): {err}")
        try:
            watcher.seen.append(watcher.passes.get(timeout=0.5))
        except queue.Empty:
            pass
    while not watcher.passes.empty():  # reports already printed belong to what was waited for
        watcher.seen.append(watcher.passes.get())


def indexed(passes: list[dict]) -> int:
    return sum(p.get("new", 0) + p.get("updated", 0) for p in passes)


def found(searcher) -> set[str]:
    return {hit.path for hit in searcher.search("chest x-ray", k=20)}


def noise_png(seed: int) -> bytes:
    """A PNG of noise: big enough to be written in chunks, and any prefix of it fails to decode."""
    pixels = np.random.default_rng(seed).integers(0, 256, (256, 256), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def model():
    from encoders import load_model
    return load_model(FIXTURE, device="cpu")


def test_changes_show_up_while_watching(tmp_path, model):
    from indexer.decode import content_hash
    from retrieval import Searcher

    folder, index = tmp_path / "in", tmp_path / "index"
    folder.mkdir()
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", folder)
    ct, mr = os.path.realpath(folder / "CT_small.dcm"), os.path.realpath(folder) + "/MR_small.dcm"
    watcher = Watcher(folder, index)
    first = watcher.next_pass()
    assert (first["changed"], first["new"], first["images"]) == (0, 1, 1)
    searcher = Searcher(index, model=model)  # opened once: it must see every later pass
    assert found(searcher) == {ct}

    shutil.copy(PYDICOM_FILES / "MR_small.dcm", folder)  # copied in
    until(lambda: mr in rows(index), "a copied file", watcher)
    assert found(searcher) == {ct, mr}

    renamed = os.path.realpath(folder) + "/renamed.dcm"
    os.rename(mr, renamed)  # moved: its stored vectors are reused, nothing encoded
    until(lambda: renamed in rows(index) and mr not in rows(index), "a renamed file", watcher)
    assert found(searcher) == {ct, renamed}
    assert sum(p.get("encoded", 0) for p in watcher.seen[1:]) == 1  # the copy only, not the rename

    os.remove(ct)  # deleted
    until(lambda: ct not in rows(index), "a deleted file", watcher)
    assert found(searcher) == {renamed}

    # Written slowly, as a copy over a network: 10 chunks over 2.5 s, longer than the debounce.
    data, slow = noise_png(1), os.path.realpath(folder) + "/slow.png"
    passes_before = len(watcher.seen)
    with open(slow, "wb") as f:
        for i in range(10):
            f.write(data[i * len(data) // 10:(i + 1) * len(data) // 10])
            f.flush()
            time.sleep(0.25)
    # A pass commits before it prints its report: wait for the report too, then judge that pass.
    until(lambda: slow in rows(index) and indexed(watcher.seen[passes_before:]), "a file written slowly",
          watcher)
    assert rows(index)[slow] == content_hash(data)  # whole
    after = watcher.seen[passes_before:]
    assert not [row for p in after for row in p.get("skipped_files", [])], after  # never read half-written
    assert indexed(after) == 1, after  # indexed once
    assert found(searcher) == {renamed, slow}

    code, err = watcher.stop(signal.SIGTERM)
    assert code == 0, err
    assert "stopped" in err
    assert set(rows(index)) == {renamed, slow}


def test_an_empty_folder_is_watched_and_sigint_stops(tmp_path):
    folder, index = tmp_path / "drop", tmp_path / "index"
    folder.mkdir()
    watcher = Watcher(folder, index)
    first = watcher.next_pass()
    assert first["error"] and "no images" in first["error"]  # reported, and the watch goes on
    (folder / "a.png").write_bytes(noise_png(2))
    until(lambda: (index / "index.sqlite").exists() and os.path.realpath(folder / "a.png") in rows(index),
          "a file in a folder that was empty", watcher)
    code, err = watcher.stop(signal.SIGINT)
    assert code == 0, err
    assert "Traceback" not in err
