"""MedImageInsight in plain PyTorch: images and texts -> unit vectors in one joint space.

    from encoders import load_model
    model = load_model("path/to/2024.09.27", towers=("text",))
    model.encode_texts(["lumbar spine fracture"])   # np.float32 (1, 1024)

The names below are loaded when first used (PEP 562), so that `encoders.defaults`, which the
command lines read before they load a model, costs no PyTorch import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .defaults import DEFAULT_MODEL, MODEL_ENV

if TYPE_CHECKING:
    from .checkpoint import CheckpointError, ModelError, ModelNotFoundError, resolve_model_source
    from .identity import describe_model
    from .inference import MedImageInsight, load_model
    from .preprocess import ImagePreprocessor, to_uint8

_WHERE = {"load_model": "inference", "describe_model": "identity", "MedImageInsight": "inference",
          "ModelError": "checkpoint", "ModelNotFoundError": "checkpoint", "CheckpointError": "checkpoint",
          "resolve_model_source": "checkpoint", "ImagePreprocessor": "preprocess", "to_uint8": "preprocess"}

__all__ = ["load_model", "describe_model", "MedImageInsight", "ModelError", "ModelNotFoundError", "CheckpointError",
           "ImagePreprocessor", "to_uint8", "resolve_model_source", "DEFAULT_MODEL", "MODEL_ENV"]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
