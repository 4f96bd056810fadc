"""The model's side of a run: which model (one rule, `indexer.model_choice`), checked against
the index's, loaded here or only described (a Ray run's actors load it); and frames -> model
batches here, one batch computing on the device while the next is collated."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..model_choice import chosen_model_source, named_model_source

if TYPE_CHECKING:
    from ..options import IndexOptions
    from ..store import IndexStore


def inductor_cache() -> str:
    """Where torch.compile keeps what it compiled, between runs: the per-user cache folder."""
    import platformdirs
    return os.path.join(platformdirs.user_cache_dir("medimageinsight-search"), "inductor")


@dataclass(frozen=True)
class ModelHeader:
    """A model as a run that does not encode here sees it: its identity (from the checkpoint's
    header, not its weights) and how it wants its input resized."""

    source: str
    fingerprint: str
    dim: int
    preprocess: Any  # encoders.ImagePreprocessor


def is_loaded(model: Any) -> bool:
    return hasattr(model, "encode_pixels")


def check_named_model(store: IndexStore, model: Any) -> None:
    """A model named explicitly (model=, --model, MI_MODEL, or a loaded one) must be the index's,
    even when nothing needs encoding; a named one is checked from its checkpoint's header."""
    if is_loaded(model):
        store.check_model(model.fingerprint, model.dim, model.source)
    elif named_model_source(model):
        from encoders import describe_model
        info = describe_model(named_model_source(model))
        store.check_model(info["fingerprint"], info["dim"], info["source"], record=False)


def load_image_tower(model: Any, store: IndexStore, options: IndexOptions) -> Any:
    """The model to encode with here: `model` when loaded, else its image tower loaded (the
    chosen source, on the asked device); made the index's model if it has none."""
    if not is_loaded(model):
        from encoders import load_model
        source = chosen_model_source(model, (store.model_info or {}).get("source"))
        model = load_model(source, device=options.device, dtype=options.dtype, towers=("image",))
    store.check_model(model.fingerprint, model.dim, model.source)
    return model


def model_header(model: Any, store: IndexStore) -> Any:
    """The model as the driver of a run that encodes elsewhere needs it (`ModelHeader`, or the
    loaded model as it is); made the index's model if it has none."""
    if not is_loaded(model):
        from encoders import describe_model
        from encoders.config import load_config
        from encoders.preprocess import ImagePreprocessor

        info = describe_model(chosen_model_source(model, (store.model_info or {}).get("source")))
        image = load_config(Path(info["source"]) / "config.yaml").image
        model = ModelHeader(info["source"], info["fingerprint"], info["dim"],
                            ImagePreprocessor(image.image_size, image.mean, image.std))
    store.check_model(model.fingerprint, model.dim, model.source)
    return model


class BatchEncoder:
    """Frames of new files -> the model in batches of `batch_size`. A file's record is complete
    when every frame has its embedding; `on_batch(complete records, frames encoded)` is called
    after each batch (to commit them)."""

    def __init__(self, model: Any, batch_size: int, on_batch: Callable[[list[dict[str, Any]], int], None]):
        self.model, self.batch_size, self.on_batch = model, batch_size, on_batch
        self.seconds = 0.0
        self._waiting: dict[str, dict[str, Any]] = {}       # files whose frames are still being encoded
        self._queue: list[tuple[str, int, np.ndarray]] = []  # (key, position in file, uint8 pixels)
        self._in_flight: tuple[list[tuple[str, int]], Any] | None = None  # the batch the device is computing

    def add(self, record: dict[str, Any], pixels: list[np.ndarray]) -> None:
        """A file's record (its `images` without embeddings yet) and the pixels of its frames;
        encodes every batch that is full."""
        key = record["path"]
        self._waiting[key] = {**record, "left": len(pixels)}
        self._queue.extend((key, position, frame) for position, frame in enumerate(pixels))
        if len(self._queue) >= self.batch_size:
            self._encode_next()

    def flush(self) -> None:
        """Encode what is queued and wait for the device."""
        if self._queue:
            self._encode_next()
        self.finish_in_flight()

    def _encode_next(self) -> None:
        """Start encoding the next batch, then finish the one before it: on a GPU the new batch
        computes while that one is committed and the next is collated, so the GPU does not wait
        for SQLite. On the CPU `start_encoding` does the work itself and nothing overlaps."""
        batch, self._queue = self._queue[:self.batch_size], self._queue[self.batch_size:]
        start = time.perf_counter()
        started = self.model.start_encoding([pixels for _, _, pixels in batch])
        self.seconds += time.perf_counter() - start
        self.finish_in_flight()
        self._in_flight = ([(key, position) for key, position, _ in batch], started)
        if len(self._queue) >= self.batch_size:
            self._encode_next()

    def finish_in_flight(self) -> None:
        """Wait for the batch on the device, attach its embeddings, hand over the files it completes."""
        if self._in_flight is None:
            return
        batch, started = self._in_flight
        self._in_flight = None
        start = time.perf_counter()
        embeddings = started.result()
        self.seconds += time.perf_counter() - start
        complete = []
        for (key, position), embedding in zip(batch, embeddings):
            waiting = self._waiting[key]
            waiting["images"][position]["embedding"] = embedding
            waiting["left"] -= 1
            if waiting["left"] == 0:
                complete.append(self._waiting.pop(key))
        self.on_batch(complete, len(batch))
