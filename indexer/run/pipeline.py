"""Items in, index out: a source lists items -> plan (what changed) -> decoding workers
(`indexer.decoding`: Decoded | Reused | Skipped records) -> encode in batches -> one SQLite
transaction per batch -> FAISS file at the end.

Incremental by mark-and-sweep (rclip): every item a source lists is compared with what the
index knows. Same version token (size and mtime for files): unchanged, not even opened.
Otherwise the item is read and hashed in a worker; content the index already holds (a rename,
a copy, a touched file) reuses its stored vectors; anything else is decoded, resized and
encoded. Known items that are gone are removed. An item that cannot be decoded is recorded
with its reason and retried only once it changes (or at once, when the cause was transient).

Crash safety: an item's rows and its `files` record are written in the same transaction, so
a killed run leaves only whole items behind; the next run redoes what was not committed.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .workers import FILES_PER_HANDOVER, Decoded, DecodingDataset, Encoded, Outcome, Reused, Skipped, loader
from ..errors import SourceError
from ..model_choice import chosen_model_source, named_model_source
from ..options import IndexOptions, compile_wanted, decoding_workers
from ..sources import Item, Source
from ..store import DB_NAME, IndexStore

log = logging.getLogger(__name__)
COMMIT_EVERY = 256  # files skipped or reused between commits when nothing is being encoded
MAX_BATCH_SIZE = 256  # images per model call, whatever --batch-size asks: about 0.7 GB of pixels



@dataclass
class Summary:
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0
    still_skipped: int = 0      # unchanged files skipped by an earlier run (retried once they change)
    encoded: int = 0            # images that went through the model in this run
    reused: int = 0             # files whose vectors were found by content hash
    images: int = 0             # images in the index after the run
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    index: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def inductor_cache() -> str:
    """Where torch.compile keeps what it compiled, between runs: the per-user cache folder."""
    import platformdirs
    return os.path.join(platformdirs.user_cache_dir("medimageinsight-search"), "inductor")


# --- the run ------------------------------------------------------------------------------------

class Indexer:
    """One run of mi-index over some paths into one index."""

    def __init__(self, store: IndexStore, *, model: Any = None, options: IndexOptions = IndexOptions(),
                 progress: Callable[[int, int, int], None] | None = None):
        self.store = store
        self.model_arg, self.options = model, options
        self.batch_size = options.batch_size  # resolved against the device once the model is loaded
        self.progress = progress or (lambda done, total, encoded: None)
        self.model = model if hasattr(model, "encode_pixels") else None
        self.summary = Summary(index=str(store.folder))
        self._pending_indexed: list[dict[str, Any]] = []
        self._pending_skipped: list[dict[str, Any]] = []
        self._waiting: dict[str, dict[str, Any]] = {}       # files whose frames are still being encoded
        self._queue: list[tuple[str, int, np.ndarray]] = []  # (key, position in file, uint8 pixels)
        self._in_flight: tuple[list[tuple[str, int]], Any] | None = None  # the batch the device is computing
        self._write_seconds = 0.0
        self._encode_seconds = 0.0

    # ---------------------------------------------------------------- model
    def _load_model(self) -> Any:
        if self.model is None:
            from encoders import load_model
            source = chosen_model_source(self.model_arg, (self.store.model_info or {}).get("source"))
            self.model = load_model(source, device=self.options.device, dtype=self.options.dtype, towers=("image",))
        self.store.check_model(self.model.fingerprint, self.model.dim, self.model.source)
        return self.model

    # ---------------------------------------------------------------- plan
    def plan(self, source: Source) -> tuple[list[Item], list[str]]:
        """The new and changed items to process, and the known keys that are gone."""
        listed = list(source.items())
        for key, reason in source.refused:  # reported, not recorded: the index holds what it can read
            self.summary.skipped += 1
            self.summary.skipped_files.append({"path": key, "reason": reason})
        known = source.known(self.store, [item.key for item in listed])
        todo, keep = [], set()
        for item in listed:
            if item.key in keep:
                continue
            before = known.get(item.key)
            if before is not None and before[:2] == (item.size, item.mtime_ns) and not before[3]:
                self.summary.unchanged += 1
                self.summary.still_skipped += before[2] is not None
            elif source.accepts(item):
                todo.append(item)
                if before is None:
                    self.summary.new += 1
                else:
                    self.summary.updated += 1
            else:
                continue  # not an image or DICOM file: not ours (and gone from the index if it was)
            keep.add(item.key)
        removed = [key for key in known if key not in keep and source.sweepable(key)]
        return todo, removed

    # ---------------------------------------------------------------- run
    def check_model_given(self) -> None:
        """A model named explicitly (--model, MI_MODEL, or a loaded one) must be the index's,
        even when nothing needs encoding; checked from the checkpoint's header, not its weights."""
        if self.model is not None:
            self.store.check_model(self.model.fingerprint, self.model.dim, self.model.source)
        elif named_model_source(self.model_arg):
            from encoders import describe_model
            info = describe_model(named_model_source(self.model_arg))
            if self.store.model_info is not None:
                self.store.check_model(info["fingerprint"], info["dim"], info["source"])

    def run(self, source: Source) -> Summary:
        start = time.perf_counter()
        self.check_model_given()
        todo, removed = self.plan(source)
        self.summary.seconds["plan"] = time.perf_counter() - start
        if todo:
            self._process(todo, source)
        self._commit(force=True)
        # Swept last, so that a renamed file can still reuse the vectors stored under its old path.
        self.store.commit(removed=removed)
        self.summary.removed = len(removed)
        if self.options.faiss_memory is not None:
            self.store.set_faiss_memory(self.options.faiss_memory or None)
        write_start = time.perf_counter()
        self.store.write_faiss()
        self._write_seconds += time.perf_counter() - write_start
        self.summary.images = self.store.count()
        self.summary.seconds.update(encode=self._encode_seconds, write=self._write_seconds,
                                    total=time.perf_counter() - start)
        return self.summary

    def _process(self, todo: list[Item], source: Source) -> None:
        model = self._load_model()
        # A batch holds 2.76 MB of pixels per image in the model's input: the batch is capped (a
        # --batch-size of 100000 once took 5.7 GB for 400 tiny images), and every batch is its
        # own transaction, so commits stay frequent whatever is asked.
        # On the CPU small batches are faster: full-size weights, float32, idle 2-core Xeon, 0.42
        # images/s at batch 1-2 against 0.37 at 4 and 0.36 at 8 (`bench_encode.py --wait-idle`).
        self.batch_size = min(self.batch_size or (64 if model.device.type == "cuda" else 2), MAX_BATCH_SIZE)
        self._compile = compile_wanted(self.options.compile, model.device.type, len(todo))
        if self._compile and self.options.ray is None and hasattr(model, "compile"):
            model.compile(cache_dir=inductor_cache())
        workers = decoding_workers(self.options.workers)
        dataset = DecodingDataset(todo, source, model.preprocess.resize, self.store.folder / DB_NAME,
                                  self.options.frames, self.options.max_megapixels, self.store.patient_key(),
                                  j2k_reduce_to=min(model.preprocess.size) if self.options.fast_j2k else None)
        self._dataset = dataset
        prefetch = max(2, self.batch_size // (max(workers, 1) * FILES_PER_HANDOVER))
        decode_seconds, position = 0.0, 0
        if self.options.ray is not None:
            return self._process_on_ray(todo, dataset)

        def take(outcome: Outcome) -> None:
            nonlocal decode_seconds, position
            decode_seconds += outcome.seconds
            position += 1
            self._take(outcome)
            if len(self._queue) >= self.batch_size:
                self._encode_queue()
            self._commit(force=False)
            self.progress(position, len(todo), self.summary.encoded)

        while position < len(todo):
            try:
                for outcomes in loader(dataset, range(position, len(todo)), workers, prefetch):
                    for outcome in outcomes:
                        take(outcome)
            except RuntimeError as e:
                if "DataLoader worker" not in str(e):
                    raise
                # A decoder crashed its process (a segfault in a codec, the OOM killer). Find the
                # item among those in flight by decoding each in a process of its own, then go on.
                log.warning("a decoding process died (%s); isolating the files in flight", e)
                in_flight = max(workers, 1) * prefetch * FILES_PER_HANDOVER
                for i in range(position, min(len(todo), position + in_flight)):
                    try:
                        (outcome,) = next(iter(loader(dataset, [i], 1, 1)))
                    except RuntimeError as again:
                        if "DataLoader worker" not in str(again):
                            raise
                        outcome = Skipped(todo[i], "crashed the decoder (its process died)")
                    take(outcome)
        if self._queue:
            self._encode_queue()
        self._finish_in_flight()
        self.summary.seconds["read_decode_in_workers"] = decode_seconds

    def _process_on_ray(self, todo: list[Item], dataset: DecodingDataset) -> None:
        """Decode and encode on a Ray cluster; commit here, as a local run does."""
        from .ray import outcomes_on_ray

        decode_seconds = 0.0
        start = time.perf_counter()
        outcomes = outcomes_on_ray(todo, dataset, self.store.content_hashes(), model_source=self.model.source,
                                   device=self.options.device, dtype=self.options.dtype,
                                   batch_size=self.batch_size, address=self.options.ray,
                                   actors=self.options.ray_actors, compile_model=self._compile)
        done = 0
        for batch in outcomes:  # a batch is what one encoding call made: committed at once, as locally
            for outcome in batch:
                decode_seconds += outcome.seconds
                self._take(outcome)
            self._commit(force=True)
            done += len(batch)
            self.progress(done, len(todo), self.summary.encoded)
        self.summary.seconds.update(read_decode_in_workers=decode_seconds, on_ray=time.perf_counter() - start)

    def _take(self, outcome: Outcome) -> None:
        item = outcome.item
        record = {"path": item.key, "size": item.size, "mtime_ns": item.mtime_ns,
                  "content_hash": outcome.content_hash}
        if isinstance(outcome, Skipped) and outcome.stop:
            self._finish_in_flight()
            self._commit(force=True)  # the whole items done so far stay: the next run resumes after them
            raise SourceError(outcome.reason)
        if isinstance(outcome, Skipped):
            self._pending_skipped.append({**record, "error": outcome.reason, "retry": outcome.retry})
            self.summary.skipped += 1
            self.summary.skipped_files.append({"path": item.key, "reason": outcome.reason})
        elif isinstance(outcome, Reused):
            rows = self.store.images_with_hash(outcome.content_hash)
            if not rows:  # removed meanwhile: decode it here after all
                return self._take(self._dataset.load(item, reuse_known=False))
            images = [{**row, "embedding": np.frombuffer(row["embedding"], np.float32)} for row in rows]
            self._pending_indexed.append({**record, "images": images})
            self.summary.reused += 1
        elif isinstance(outcome, Encoded):
            images = [{**outcome.metadata, "frame": index, "width": w, "height": h, "embedding": vector}
                      for (index, w, h), vector in zip(outcome.frames, outcome.vectors)]
            self._pending_indexed.append({**record, "images": images})
            self.summary.encoded += len(images)
        elif isinstance(outcome, Decoded):
            images = [{**outcome.metadata, "frame": index, "width": w, "height": h, "embedding": None}
                      for index, w, h in outcome.frames]
            self._waiting[item.key] = {**record, "images": images, "left": len(images)}
            self._queue.extend((item.key, position, pixels) for position, pixels in enumerate(outcome.pixels))

    def _encode_queue(self) -> None:
        """Start encoding the next batch, then finish the one before it: on a GPU the new batch
        computes while that one is committed and the next is collated, so the GPU does not wait
        for SQLite. On the CPU `start_encoding` does the work itself and nothing overlaps."""
        batch, self._queue = self._queue[:self.batch_size], self._queue[self.batch_size:]
        start = time.perf_counter()
        started = self.model.start_encoding([pixels for _, _, pixels in batch])
        self._encode_seconds += time.perf_counter() - start
        self._finish_in_flight()
        self._in_flight = ([(path, position) for path, position, _ in batch], started)
        if len(self._queue) >= self.batch_size:
            self._encode_queue()

    def _finish_in_flight(self) -> None:
        """Wait for the batch on the device, attach its embeddings, commit the files it completes."""
        if self._in_flight is None:
            return
        batch, started = self._in_flight
        self._in_flight = None
        start = time.perf_counter()
        embeddings = started.result()
        self._encode_seconds += time.perf_counter() - start
        self.summary.encoded += len(batch)
        for (path, position), embedding in zip(batch, embeddings):
            waiting = self._waiting[path]
            waiting["images"][position]["embedding"] = embedding
            waiting["left"] -= 1
            if waiting["left"] == 0:
                self._pending_indexed.append(self._waiting.pop(path))
        self._commit(force=True)

    def _commit(self, force: bool) -> None:
        pending = len(self._pending_indexed) + len(self._pending_skipped)
        if pending and (force or pending >= COMMIT_EVERY):
            start = time.perf_counter()
            self.store.commit(indexed=self._pending_indexed, skipped=self._pending_skipped)
            self._write_seconds += time.perf_counter() - start
            self._pending_indexed, self._pending_skipped = [], []


