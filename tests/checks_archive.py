"""Shared by the browser tests of the page's dataset views: a small archive of real files in two folders (train/,
test/) with pydicom-data's RG1 chest CR in three transfer syntaxes (near duplicates, one study, one patient) split
across them, a planted patient in both, and a byte copy; indexed with the tiny fixture model and mapped (`mi map`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from made_images import planted_cr
from servers import FIXTURE, PYDICOM_FILES

PLANTED_ID = "PID-40417-PLANTED"


def build_checks_archive(root: Path) -> dict:
    """root/data/{train,test} and root/index (mapped with PCA); returns their paths."""
    import data_store

    import indexer
    from encoders import load_model
    from retrieval.commands import mi

    rg1 = Path(data_store.__file__).parent / "data"
    train, test = root / "data" / "train", root / "data" / "test"
    train.mkdir(parents=True)
    test.mkdir()
    shutil.copy(rg1 / "RG1_UNCR.dcm", train)
    shutil.copy(rg1 / "RG1_UNCR.dcm", train / "RG1_UNCR_copy.dcm")  # same file content
    shutil.copy(rg1 / "RG1_J2KR.dcm", test)
    shutil.copy(rg1 / "RG1_J2KI.dcm", test)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(PYDICOM_FILES / name, train)
    shutil.copy(PYDICOM_FILES / "examples_overlay.dcm", test)
    planted_cr(train / "planted_a.dcm", PLANTED_ID, seed=1, body_part="HAND")
    planted_cr(test / "planted_b.dcm", PLANTED_ID, seed=2, body_part="HAND")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save((train, test)[i % 2] / f"png{i}.png")
    index = root / "index"
    indexer.index_paths([root / "data"], index, model=load_model(FIXTURE, device="cpu"), workers=0)
    result = CliRunner().invoke(mi, ["map", "--index", str(index), "--method", "pca", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"root": root, "train": train, "test": test, "index": index}


def cli_json(*args: str) -> dict:
    """What `mi ARGS --json` reports (leakage exits 1 when it finds leakage)."""
    from retrieval.commands import mi

    result = CliRunner().invoke(mi, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.output)
