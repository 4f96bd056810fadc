"""A model's identity without loading its weights or PyTorch: `describe_model` (what an index
records of its model, and checks before a run) and `model_fingerprint`."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointHeader, ModelError, checkpoint_path, resolve_model_source
from .config import ConfigError, ModelConfig, load_config


def model_fingerprint(checkpoint: CheckpointHeader, cfg: ModelConfig) -> str:
    """The model's identity: its checkpoint's and the network sizes config.yaml gives (the
    same weights under another window size or input size give other embeddings)."""
    return hashlib.sha256(f"{checkpoint.fingerprint()} {cfg!r}".encode()).hexdigest()[:32]


def describe_model(source: str | os.PathLike | None = None) -> dict[str, Any]:
    """{fingerprint, dim, source} of a model without loading its weights (reads the
    checkpoint's header and a few sampled blocks): to check an index's model cheaply."""
    folder = resolve_model_source(source)
    try:
        cfg = load_config(folder / "config.yaml")
    except ConfigError as e:
        raise ModelError(str(e)) from None
    return {"fingerprint": model_fingerprint(CheckpointHeader(checkpoint_path(folder)), cfg), "dim": cfg.embed_dim,
            "source": str(Path(folder).resolve())}
