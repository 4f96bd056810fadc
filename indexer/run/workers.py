"""The decoding stage, run in worker processes: an item -> its bytes -> hashed -> reused, or
decoded and resized to 8-bit pixels at the model's size, or skipped with a reason. Each outcome
is a small record; the main process only collects them.

Workers die with their parent (a SIGKILL of mi-index must not leave them holding anything),
and hand files over in groups, so that the main process pays the hand-over once per group.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..decode import DecodeError, TransientDecodeError, content_hash, decode_bytes
from ..errors import REASON_LIMIT, SourceError, one_line
from ..sources import Item, Source
from ..sources.guards import RetrievalFailed

log = logging.getLogger(__name__)


@dataclass
class Resized:
    """New content decoded and resized for the model, waiting to be encoded: metadata, and per
    frame its index, size and 8-bit pixels at the model's size."""

    item: Item
    content_hash: str
    metadata: dict[str, Any]
    frames: list[tuple[int, int, int]]            # (frame index, width, height) in the file
    pixels: list[np.ndarray]                      # uint8 (H, W) or (H, W, 3), one per frame
    seconds: float = 0.0


@dataclass
class Reused:
    """Content the index already holds under another key (a rename, a copy): its vectors are reused."""

    item: Item
    content_hash: str
    seconds: float = 0.0


@dataclass
class Skipped:
    """An item that cannot be indexed, with the reason; `retry` when the cause was this run's
    (out of memory), not the item's; `stop` when the source itself failed (a PACS that stopped
    answering): the run stops there, and this item is not recorded."""

    item: Item
    reason: str
    content_hash: str | None = None
    retry: bool = False
    seconds: float = 0.0
    stop: bool = False
    not_retrieved: bool = False  # the source did not deliver it whole (indexer.sources.guards): not recorded


@dataclass
class Encoded:
    """Resized content already through the model (on a cluster's encoding actor): per frame
    its index, size and unit vector, in place of the pixels."""

    item: Item
    content_hash: str
    metadata: dict[str, Any]
    frames: list[tuple[int, int, int]]            # (frame index, width, height) in the file
    vectors: np.ndarray                           # float32 (frames, dim)
    seconds: float = 0.0


Outcome = Union[Resized, Encoded, Reused, Skipped]


@dataclass
class DecodingDataset:
    """Items for a torch DataLoader: each read from its source, hashed, and (unless its content
    is already indexed) decoded and resized, in the worker process."""

    items: Sequence[Item]
    source: Source
    resize: Any                      # the model's `preprocess.resize`: an image -> uint8 pixels
    known: Container[str]            # content hashes already indexed (`digest in known`)
    frames: str
    max_megapixels: float
    patient_key: bytes | None
    j2k_reduce_to: int | None = None  # decode_bytes's: large JPEG 2000 at a reduced level (--fast-j2k)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Outcome:
        return self.load(self.items[i])

    def __getitems__(self, indices: Sequence[int]) -> list[Outcome]:
        """A worker's group of items; a source that can (a PACS) reads their bytes concurrently."""
        read_many = getattr(self.source, "read_many", None)
        if read_many is None or len(indices) < 2:
            return [self.load(self.items[i]) for i in indices]
        start = time.perf_counter()
        items = [self.items[i] for i in indices]
        datas = read_many(items)
        share = (time.perf_counter() - start) / len(items)
        outcomes = []
        for item, data in zip(items, datas):
            outcome = self.load(item, data=data)
            outcome.seconds += share
            outcomes.append(outcome)
        return outcomes

    def load(self, item: Item, reuse_known: bool = True, data: bytes | BaseException | None = None) -> Outcome:
        """`data`: the item's bytes (or the error reading them) when already read."""
        start = time.perf_counter()
        digest = None
        try:
            if isinstance(data, BaseException):
                raise data
            if data is None:
                data = self.source.read(item)
            digest = content_hash(data)
            if reuse_known and digest in self.known:
                outcome: Outcome = Reused(item, digest)
            else:
                decoded = decode_bytes(data, Path(item.key), frames=self.frames, max_megapixels=self.max_megapixels,
                                       patient_key=self.patient_key, kind=getattr(self.source, "kind", None),
                                       j2k_reduce_to=self.j2k_reduce_to)
                outcome = Resized(item, digest, {**decoded.metadata, "source_format": decoded.source_format},
                                  [(index, image.width, image.height) for index, image in decoded.frames],
                                  [self.resize(image) for _, image in decoded.frames])
        except SourceError as e:
            outcome = Skipped(item, str(e), digest, retry=True, stop=True)
        except DecodeError as e:
            outcome = Skipped(item, str(e), digest, retry=isinstance(e, TransientDecodeError),
                              not_retrieved=isinstance(e, RetrievalFailed))
        except MemoryError:
            outcome = Skipped(item, "out of memory while reading (tried again next run)", digest, retry=True)
        except OSError as e:
            outcome = Skipped(item, f"unreadable: {e.strerror or e}", digest)
        except Exception as e:  # never lose the run to one file
            outcome = Skipped(item, f"{type(e).__name__}: {one_line(e, REASON_LIMIT)}", digest)
        outcome.seconds = time.perf_counter() - start
        return outcome


FILES_PER_HANDOVER = 8  # files a worker decodes and hands over at once: the hand-over costs per call


def loader(dataset: DecodingDataset, indices: Sequence[int], workers: int, prefetch: int):
    """Lists of up to FILES_PER_HANDOVER items of `dataset` at `indices`, in order, decoded by
    `workers` processes (0: here). Handing files over in groups divides the main process's
    per-call cost (the pipe, the unpickling, DataLoader's bookkeeping) by the group's size."""
    from torch.utils.data import DataLoader, Subset
    return DataLoader(Subset(dataset, list(indices)), batch_size=FILES_PER_HANDOVER, num_workers=workers,
                      worker_init_fn=_worker_init, prefetch_factor=prefetch if workers else None,
                      collate_fn=_identity, pin_memory=False, persistent_workers=False)


def isolating_crashes(dataset: DecodingDataset, workers: int, prefetch: int) -> Iterator[list[Outcome]]:
    """Every item of `dataset` as an outcome, in order, in groups (`loader`). A decoder that
    crashes its process (a segfault in a codec, the OOM killer) costs only its item: the items in
    flight are decoded again each in a process of its own, the one that crashes again skipped."""
    position = 0
    while position < len(dataset):
        try:
            for outcomes in loader(dataset, range(position, len(dataset)), workers, prefetch):
                yield outcomes
                position += len(outcomes)
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            log.warning("a decoding process died (%s); isolating the files in flight", e)
            in_flight = max(workers, 1) * prefetch * FILES_PER_HANDOVER
            for i in range(position, min(len(dataset), position + in_flight)):
                try:
                    outcomes = next(iter(loader(dataset, [i], 1, 1)))
                except RuntimeError as again:
                    if "DataLoader worker" not in str(again):
                        raise
                    outcomes = [Skipped(dataset.items[i], "crashed the decoder (its process died)")]
                yield outcomes
                position += 1


def _identity(items: list[Outcome]) -> list[Outcome]:
    return items


def _worker_init(_worker_id: int) -> None:
    import torch
    _die_with_parent()
    torch.set_num_threads(1)  # the model's process uses the cores; workers decode one file each


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the process that started it dies: a worker orphaned
    by a SIGKILL of mi-index would otherwise block forever writing into a pipe no one reads."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


