"""The installed console scripts (`entry`, which leaves with os._exit to skip the interpreter's
teardown): run as real processes through pipes, their output arrives whole and their exit
codes (0, 1 for one-line errors, 2 for usage) survive."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "medimageinsight-tiny"


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MI_MODEL", None)
    env.pop("MI_INDEX", None)
    return subprocess.run([sys.executable, "-c", f"from {module} import entry; entry()", *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_console_scripts_flush_output_and_keep_exit_codes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(40):
        Image.fromarray(np.full((16, 16), i * 6, np.uint8)).save(data / f"{i:02d}.png")
    index = str(tmp_path / "index")

    indexed = run("indexer.cli", str(data), "--index", index, "--model", str(FIXTURE), "--json", "--workers", "0")
    assert indexed.returncode == 0, indexed.stderr
    assert json.loads(indexed.stdout)["new"] == 40

    found = run("retrieval.cli", "a grey square", "--index", index, "-k", "40", "--json")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert [hit["rank"] for hit in hits] == list(range(1, 41))

    missing = run("retrieval.cli", "anything", "--index", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip().startswith("Error: no index at") and "Traceback" not in missing.stderr
    assert run("indexer.cli", "--version").returncode == 0
    assert run("indexer.cli").returncode == 2  # usage error: PATHS missing
