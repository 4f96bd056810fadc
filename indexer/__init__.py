"""Files in, index out: `mi-index` and its Python API.

    import indexer
    summary = indexer.index_paths(["./xrays"], "./my-index", model="/data/MedImageInsights")
    summary["new"], summary["skipped_files"]
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .store import default_index_dir


def index_paths(paths: Sequence[str | os.PathLike], index_dir: str | os.PathLike | None = None, *,
                model: Any = None, batch_size: int | None = None, workers: int | None = None,
                device: str | None = None, dtype: str | None = None, max_megapixels: float = 100.0,
                frames: str = "middle", progress: Callable[[int, int, int], None] | bool = False) -> dict[str, Any]:
    """Index (or update) `paths` into the index at `index_dir` (default: MI_INDEX, else the
    per-user folder). `model`: a loaded encoder, a model folder or Hugging Face id, or None
    (MI_MODEL, else the index's model, else the default). Returns the run's summary: integer
    counts new / updated / unchanged / removed / skipped / encoded / reused / images, the
    skipped files with their reasons, and timings."""
    from .pipeline import Indexer
    from .store import IndexStore

    if progress is True:  # a rich bar on stderr, as mi-index shows
        from rich.console import Console

        from .cli import ProgressBar
        with ProgressBar(Console(stderr=True), enabled=True) as update:
            return index_paths(paths, index_dir, model=model, batch_size=batch_size, workers=workers, device=device,
                               dtype=dtype, max_megapixels=max_megapixels, frames=frames, progress=update)
    with IndexStore.open(index_dir or default_index_dir(), create=True) as store:
        store.lock()
        run = Indexer(store, model=model, device=device, dtype=dtype, batch_size=batch_size, workers=workers,
                      frames=frames, max_megapixels=max_megapixels,
                      progress=progress if callable(progress) else None)
        return run.run([Path(p) for p in paths]).as_dict()


__all__ = ["index_paths", "default_index_dir"]
