"""Synthetic indexes for the dataset checks' tests and benchmark, written through the real store:
vectors whose answers are known (planted duplicates, patients, studies)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def near(vector: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly `cosine` from `vector` (unit)."""
    noise = rng.standard_normal(vector.shape)
    noise -= (noise @ vector) * vector
    noise /= np.linalg.norm(noise)
    return unit(cosine * vector + np.sqrt(1 - cosine ** 2) * noise)


def write_index(folder: Path, images: list[dict[str, Any]], dim: int, batch: int = 5000) -> Path:
    """An index at `folder` holding `images`: dicts with path, embedding and any stored fields
    (frame, sop_instance_uid, study_instance_uid, series_instance_uid, patient_hash, modality,
    content_hash, ...). Files with several frames are given as several dicts with one path."""
    from indexer.store import IndexStore

    store = IndexStore.open(folder, create=True)
    try:
        store.check_model("synthetic", dim, "synthetic")
        by_path: dict[str, list[dict[str, Any]]] = {}
        for image in images:
            by_path.setdefault(str(image["path"]), []).append(image)
        files = []
        for path, frames in by_path.items():
            files.append({"path": path, "size": 1, "mtime_ns": 1,
                          "content_hash": frames[0].get("content_hash") or f"hash-of-{path}",
                          "images": [{**{k: v for k, v in f.items() if k not in ("path", "content_hash")},
                                      "frame": f.get("frame", 0)} for f in frames]})
        for start in range(0, len(files), batch):
            store.commit(indexed=files[start:start + batch])
        store.write_faiss()
    finally:
        store.close()
    return folder
