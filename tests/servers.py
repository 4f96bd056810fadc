"""Shared by the tests of mi-serve, of mi-search through it and of its web page: a small
archive of real DICOM and PNG files indexed with the tiny fixture model, and a real `mi-serve`
process on a free loopback port (started with --port 0, stopped by its PID)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REPO = Path(__file__).parents[1]
DICOM_NAMES = ("CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm")


def build_archive(root: Path) -> dict:
    """root/data: 3 real DICOM files (CT, MR, and one without a modality filter match) and 4
    PNGs; root/index: their index. Returns the paths and the loaded model."""
    import indexer
    from encoders import load_model

    data = root / "data"
    data.mkdir()
    for name in DICOM_NAMES:
        shutil.copy(PYDICOM_FILES / name, data)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(data / f"png{i}.png")
    model = load_model(FIXTURE, device="cpu")
    indexer.index_paths([data], root / "index", model=model, workers=0)
    return {"root": root, "data": data, "index": root / "index", "model": model}


def command_env(**extra: str) -> dict[str, str]:
    """The environment of a command under test: this checkout, offline, one thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


@dataclass
class Served:
    process: subprocess.Popen
    url: str            # http://127.0.0.1:PORT
    token: str | None
    announced: str = ""  # what mi-serve printed on stderr up to the line naming its URL


def start_server(index: Path, *options: str, env: dict[str, str] | None = None) -> Served:
    """A real mi-serve process over `index` with the fixture model, on a free port; returns once
    it listens (its first line on stderr names the URL)."""
    process = subprocess.Popen([sys.executable, "-c", "from retrieval.serve_cli import main; main()",
                                "--index", str(index), "--model", str(FIXTURE), "--port", "0", *options],
                               env=env or command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    lines = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"serving .* on (http://\S+?)/(?:\?token=(\S+))?$", line.strip())
        if match:
            _wait_until_answering(match.group(1), process)
            return Served(process, match.group(1), match.group(2), "".join(lines))
    stop_server(process)
    raise AssertionError(f"mi-serve did not start: {''.join(lines)}")


def _wait_until_answering(url: str, process: subprocess.Popen) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/health", timeout=2).close()
            return
        except urllib.error.HTTPError:  # answering (401 without a token)
            return
        except OSError:
            assert process.poll() is None and time.time() < deadline, "mi-serve did not answer"
            time.sleep(0.1)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM (a clean shutdown), SIGKILL after 15 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr:
        process.stderr.close()
