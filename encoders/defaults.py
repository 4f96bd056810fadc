"""What the encoder assumes when not told, without importing PyTorch: the model (MI_MODEL, else the
published one), which device names there are, and the batch per kind of device. The command lines
check --device and settle a run from here before anything heavy is loaded."""
from __future__ import annotations

import os
import re

DEFAULT_MODEL = "lion-ai/MedImageInsights"
MODEL_ENV = "MI_MODEL"

DEVICE_CHOICES = "cpu, cuda or cuda:N"

# Images per model call when none is asked for. CUDA: 64, mi-index's batch since it overlapped
# batches (44 MB of uint8 a batch against ~130 ms of compute at 490 images/s on an H100). On the
# CPU small batches are faster: full-size weights, float32, idle 2-core Xeon, 0.42 images/s at
# batch 1-2 against 0.37 at 4 and 0.36 at 8 (`bench_encode.py --wait-idle`).
CUDA_BATCH_SIZE = 64
CPU_BATCH_SIZE = 2


def named_model(explicit: str | os.PathLike | None = None) -> str | None:
    """The model the caller named: `explicit` (--model, model=), else the MI_MODEL environment
    variable; None when neither is set (empty counts as unset)."""
    for source in (explicit, os.environ.get(MODEL_ENV)):
        if source not in (None, ""):
            return os.fspath(source)
    return None


def device_name(value: str) -> str:
    """`value` as the name of a device the encoder runs on: "cpu", "cuda" or "cuda:N" (case and
    surrounding spaces ignored). ValueError, saying which names there are, for anything else."""
    name = value.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"{value!r} is not a device: use {DEVICE_CHOICES}")
    return name


def default_batch_size(device_type: str) -> int:
    """Images per model call on a `device_type` ("cuda" or "cpu") device when none is asked for."""
    return CUDA_BATCH_SIZE if device_type == "cuda" else CPU_BATCH_SIZE
