"""Items in, index out: a source lists items -> plan (what changed) -> decoding workers
(`indexer.run.workers`: Resized | Reused | Skipped records) -> encode in batches -> one SQLite
transaction per batch -> FAISS file at the end. One loop, two executors: this machine
(`run.local`) or a Ray cluster (`run.ray`), which encodes there and sends back Encoded records.

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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


from ..errors import SourceError
from ..options import IndexOptions, settle
from ..sources import Item, Source
from ..store import IndexStore
from .commit import Committer
from .encode import BatchEncoder, check_named_model
from .plan import plan
from .workers import DecodingDataset, Encoded, Outcome, Resized, Reused, Skipped

Progress = Callable[[int, int, int], None]  # (items done, items to do, images encoded)


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
    not_retrieved: int = 0      # PACS instances not received whole: not recorded, retrieved again next run
    images: int = 0             # images in the index after the run
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    index: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Indexer:
    """One run of mi-index over what a source lists, into one index."""

    def __init__(self, store: IndexStore, *, model: Any = None, options: IndexOptions = IndexOptions(),
                 progress: Progress | None = None):
        self.store = store
        self.model, self.options = model, options  # a loaded encoder, a model source, or None
        self.progress = progress or (lambda done, total, encoded: None)
        self.summary = Summary(index=str(store.folder))
        self.committer = Committer(store)
        self._encoder: BatchEncoder | None = None
        self._dataset: DecodingDataset | None = None

    def run(self, source: Source) -> Summary:
        start = time.perf_counter()
        check_named_model(self.store, self.model)
        todo, removed = plan(source, self.store, self.summary)
        self.summary.seconds["plan"] = time.perf_counter() - start
        if todo:
            self._process(todo, source)
        self.committer.commit(force=True)
        # Swept last, so that a renamed file can still reuse the vectors stored under its old path.
        self.store.commit(removed=removed)
        self.summary.removed = len(removed)
        if self.options.faiss_memory is not None:
            self.store.set_faiss_memory(self.options.faiss_memory or None)
        write_start = time.perf_counter()
        self.store.write_faiss()
        self.summary.images = self.store.count()
        self.summary.seconds.update(encode=self._encoder.seconds if self._encoder else 0.0,
                                    write=self.committer.seconds + time.perf_counter() - write_start,
                                    total=time.perf_counter() - start)
        return self.summary

    def _process(self, todo: list[Item], source: Source) -> None:
        if self.options.ray is not None:
            from .ray import RayExecutor as Executor
        else:
            from .local import LocalExecutor as Executor
        executor = Executor(self.model, self.store, self.options)
        settings = settle(self.options, executor.device_type, len(todo))
        self._encoder = executor.encoder(settings, self._encoded)
        size = executor.preprocess.size
        self._dataset = DecodingDataset(todo, source, executor.preprocess.resize, executor.known, self.options.frames,
                                        self.options.max_megapixels, self.store.patient_key(),
                                        j2k_reduce_to=min(size) if self.options.fast_j2k else None)
        start, decode_seconds, done = time.perf_counter(), 0.0, 0
        for group in executor.outcomes(self._dataset, settings):
            for outcome in group:
                decode_seconds += outcome.seconds
                done += 1
                self._take(outcome)
                self.committer.commit(force=False)
                self.progress(done, len(todo), self.summary.encoded)
            if executor.commits_each_group:
                self.committer.commit(force=True)
        if self._encoder is not None:
            self._encoder.flush()
        self.summary.seconds["read_decode_in_workers"] = decode_seconds
        if executor.timing:
            self.summary.seconds[executor.timing] = time.perf_counter() - start

    def _encoded(self, complete: list[dict[str, Any]], frames: int) -> None:
        """A batch is through the model: its frames counted, the files it completed committed."""
        self.summary.encoded += frames
        self.committer.indexed.extend(complete)
        self.committer.commit(force=True)

    def _take(self, outcome: Outcome) -> None:
        item = outcome.item
        record = {"path": item.key, "size": item.size, "mtime_ns": item.mtime_ns,
                  "content_hash": outcome.content_hash}
        if isinstance(outcome, Skipped) and outcome.stop:
            if self._encoder is not None:
                self._encoder.finish_in_flight()
            self.committer.commit(force=True)  # the whole items done so far stay: the next run resumes after them
            raise SourceError(outcome.reason)
        if isinstance(outcome, Skipped) and outcome.not_retrieved:  # reported, not recorded: retried next run
            self.summary.not_retrieved += 1
            self.summary.skipped_files.append({"path": item.key, "reason": outcome.reason})
        elif isinstance(outcome, Skipped):
            self.committer.skipped.append({**record, "error": outcome.reason, "retry": outcome.retry})
            self.summary.skipped += 1
            self.summary.skipped_files.append({"path": item.key, "reason": outcome.reason})
        elif isinstance(outcome, Reused):
            rows = self.store.images_with_hash(outcome.content_hash)
            if not rows:  # removed meanwhile: decode it here after all
                return self._take(self._dataset.load(item, reuse_known=False))
            images = [{key: value for key, value in row.items() if key != "id"} for row in rows]
            self.committer.indexed.append({**record, "images": images})
            self.summary.reused += 1
        elif isinstance(outcome, Encoded):
            images = [{**outcome.metadata, "frame": index, "width": w, "height": h, "embedding": vector}
                      for (index, w, h), vector in zip(outcome.frames, outcome.vectors)]
            self.committer.indexed.append({**record, "images": images})
            self.summary.encoded += len(images)
        elif isinstance(outcome, Resized) and self._encoder is None:  # decoded here after all, on a Ray run
            self._take(Skipped(item, "its content left the index during the run (tried again next run)",
                               outcome.content_hash, retry=True))
        elif isinstance(outcome, Resized):
            images = [{**outcome.metadata, "frame": index, "width": w, "height": h, "embedding": None}
                      for index, w, h in outcome.frames]
            self._encoder.add({**record, "images": images}, outcome.pixels)
