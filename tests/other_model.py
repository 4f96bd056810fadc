"""A copy of the tiny fixture model with other weights, for the tests of the model check."""
from __future__ import annotations

import shutil
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"


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
