"""MedImageInsight in plain PyTorch: images and texts -> unit vectors in one joint space.

    from encoders import load_model
    model = load_model("path/to/2024.09.27", towers=("text",))
    model.encode_texts(["lumbar spine fracture"])   # np.float32 (1, 1024)
"""
from .checkpoint import (DEFAULT_MODEL, MODEL_ENV, CheckpointError, ModelError, ModelNotFoundError,
                         resolve_model_source)
from .inference import MedImageInsight, describe_model, load_model
from .preprocess import ImagePreprocessor, to_uint8

__all__ = ["load_model", "describe_model", "MedImageInsight", "ModelError", "ModelNotFoundError", "CheckpointError",
           "ImagePreprocessor", "to_uint8", "resolve_model_source", "DEFAULT_MODEL", "MODEL_ENV"]
