"""A run on this machine: decoding worker processes here, and the model in this process."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .encode import BatchEncoder, inductor_cache, load_image_tower
from .workers import FILES_PER_HANDOVER, DecodingDataset, Outcome, isolating_crashes

if TYPE_CHECKING:
    from ..options import IndexOptions, RunSettings
    from ..store import IndexStore


class LocalExecutor:
    """Decodes in `settings.workers` processes and encodes with the model loaded here."""

    commits_each_group = False  # groups are hand-overs of a few files: committed as batches are encoded
    timing = None

    def __init__(self, model: Any, store: IndexStore, options: IndexOptions):
        self.model = load_image_tower(model, store, options)
        self.device_type = self.model.device.type
        self.preprocess = self.model.preprocess
        self.known = store.content_lookup()

    def encoder(self, settings: RunSettings,
                on_batch: Callable[[list[dict[str, Any]], int], None]) -> BatchEncoder:
        if settings.compile and hasattr(self.model, "compile"):
            self.model.compile(cache_dir=inductor_cache())
        return BatchEncoder(self.model, settings.batch_size, on_batch)

    def outcomes(self, dataset: DecodingDataset, settings: RunSettings) -> Iterator[list[Outcome]]:
        # Enough groups in flight per worker to fill a batch, two at least
        prefetch = max(2, settings.batch_size // (max(settings.workers, 1) * FILES_PER_HANDOVER))
        return isolating_crashes(dataset, settings.workers, prefetch)
