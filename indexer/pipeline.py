"""Files in, index out: walk -> decide what changed -> decode in worker processes ->
encode in batches -> one SQLite transaction per batch -> FAISS file at the end.

Incremental by mark-and-sweep (rclip): every file under the given paths is compared with
what the index knows. Same size and mtime: unchanged, not even opened. Otherwise the file
is read and hashed in a worker; content the index already holds (a rename, a copy, a
touched file) reuses its stored vectors; anything else is decoded, preprocessed and
encoded. Known files that are gone are removed. A file that cannot be decoded is
recorded with its reason and retried only once it changes.

Crash safety: a file's rows and its `files` record are written in the same transaction,
so a killed run leaves only whole files behind; the next run redoes what was not committed.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .decode import DecodeError, TransientDecodeError, content_hash, decode_bytes, sniff_kind
from .errors import PathNotFoundError
from .model_choice import chosen_model_source, named_model_source
from .options import IndexOptions
from .store import DB_NAME, IndexStore, sqlite_uri

log = logging.getLogger(__name__)
COMMIT_EVERY = 256  # files skipped or reused between commits when nothing is being encoded
MAX_BATCH_SIZE = 256  # images per model call, whatever --batch-size asks: about 0.7 GB of pixels



@dataclass
class Job:
    path: str
    size: int
    mtime_ns: int


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


# --- walking -----------------------------------------------------------------------------------

def walk(roots: Sequence[Path], skip: Path | None = None, unreadable: list[str] | None = None,
         not_files: list[str] | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """(resolved path, stat) of every regular file under `roots` (folders walked recursively,
    files taken as they are). Hidden files and folders and the `skip` folder are left out;
    symlinked folders are followed once, so loops end. Folders that cannot be listed are
    appended to `unreadable` (resolved), so their known files are not taken for deleted.
    Roots that are neither folders nor regular files (a FIFO, a device: reading one could
    block forever) are appended to `not_files`."""
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        root = Path(root).expanduser()
        if not root.exists():
            raise PathNotFoundError(f"no such file or folder: {root}")
        if not root.is_dir():
            st = root.stat()
            if stat.S_ISREG(st.st_mode):
                yield os.path.realpath(root), st
            elif not_files is not None:
                not_files.append(str(root))
            continue
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = folder.stat()
                if (st.st_dev, st.st_ino) in seen_dirs or (skip is not None and folder.resolve() == skip):
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
            except OSError as e:
                log.warning("cannot read folder %s: %s", folder, e.strerror)
                if unreadable is not None:
                    unreadable.append(os.path.realpath(folder))
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir():
                        stack.append(Path(entry.path))
                    elif entry.is_file():
                        yield os.path.realpath(entry.path), entry.stat()
                except OSError:
                    continue  # a dangling link or a file gone meanwhile


# --- the worker side: one file -> pixels, or a reason ---------------------------------------------

class FileDataset:
    """Items for a torch DataLoader: each job read, hashed, and (unless its content is already
    indexed) decoded and preprocessed, in the worker process."""

    def __init__(self, jobs: list[Job], *, preprocess: Callable, db_path: Path, frames: str,
                 max_megapixels: float, patient_key: bytes):
        self.jobs, self.preprocess, self.db_path = jobs, preprocess, db_path
        self.frames, self.max_megapixels, self.patient_key = frames, max_megapixels, patient_key
        self._db: sqlite3.Connection | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def _known(self, digest: str) -> bool:
        if self._db is None:  # one read-only connection per worker process
            self._db = sqlite3.connect(sqlite_uri(self.db_path, mode="ro"), uri=True, timeout=30)
        return self._db.execute("SELECT 1 FROM images WHERE content_hash = ? LIMIT 1", (digest,)).fetchone() is not None

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.load(self.jobs[i])

    def load(self, job: Job, reuse_known: bool = True) -> dict[str, Any]:
        start = time.perf_counter()
        item: dict[str, Any] = {"job": job, "content_hash": None}
        try:
            with open(job.path, "rb") as f:
                data = f.read()
            item["content_hash"] = content_hash(data)
            if reuse_known and self._known(item["content_hash"]):
                item["kind"] = "reuse"
            else:
                decoded = decode_bytes(data, Path(job.path), frames=self.frames,
                                       max_megapixels=self.max_megapixels, patient_key=self.patient_key)
                item.update(kind="decoded", metadata={**decoded.metadata, "source_format": decoded.source_format},
                            frames=[(index, image.width, image.height) for index, image in decoded.frames],
                            pixels=[self.preprocess.resize(image) for _, image in decoded.frames])
        except DecodeError as e:
            item.update(kind="skip", error=str(e), retry=isinstance(e, TransientDecodeError))
        except MemoryError:
            item.update(kind="skip", error="out of memory while reading (tried again next run)", retry=True)
        except OSError as e:
            item.update(kind="skip", error=f"unreadable: {e.strerror or e}")
        except Exception as e:  # never lose the run to one file
            item.update(kind="skip", error=f"{type(e).__name__}: {e}"[:200])
        item["seconds"] = time.perf_counter() - start
        return item


FILES_PER_HANDOVER = 8  # files a worker decodes and hands over at once: the hand-over costs per call


def _loader(dataset: FileDataset, indices: Sequence[int], workers: int, prefetch: int):
    """Lists of up to FILES_PER_HANDOVER items of `dataset` at `indices`, in order, decoded by
    `workers` processes (0: here). Handing files over in groups divides the main process's
    per-call cost (the pipe, the unpickling, DataLoader's bookkeeping) by the group's size."""
    from torch.utils.data import DataLoader, Subset
    return DataLoader(Subset(dataset, list(indices)), batch_size=FILES_PER_HANDOVER, num_workers=workers,
                      worker_init_fn=_worker_init, prefetch_factor=prefetch if workers else None,
                      collate_fn=_identity, pin_memory=False, persistent_workers=False)


def _identity(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
        self._queue: list[tuple[str, int, np.ndarray]] = []  # (path, position in file, pixels)
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
    def plan(self, roots: Sequence[Path]) -> tuple[list[Job], list[str]]:
        """Jobs for new and changed files, and the known paths that are gone."""
        unreadable: list[str] = []
        not_files: list[str] = []
        walked = list(walk(roots, skip=self.store.folder, unreadable=unreadable, not_files=not_files))
        for path in not_files:  # reported, not recorded: the index holds files only
            self.summary.skipped += 1
            self.summary.skipped_files.append({"path": path, "reason": "not a regular file (a FIFO, device or socket)"})
        known = self.store.files_under([Path(os.path.realpath(Path(r).expanduser())) for r in roots])
        # files reached through a symlinked folder live outside the roots: look them up one by one
        known.update(self.store.files_at([path for path, _ in walked if path not in known]))
        jobs, keep = [], set()
        for path, st in walked:
            if path in keep:
                continue
            before = known.get(path)
            if before is not None and before[:2] == (st.st_size, st.st_mtime_ns) and not before[3]:
                self.summary.unchanged += 1
                self.summary.still_skipped += before[2] is not None
            elif sniff_kind(Path(path)) is not None:
                jobs.append(Job(path, st.st_size, st.st_mtime_ns))
                if before is None:
                    self.summary.new += 1
                else:
                    self.summary.updated += 1
            else:
                continue  # not an image or DICOM file: not ours (and gone from the index if it was)
            keep.add(path)
        unreadable_prefixes = tuple(folder.rstrip(os.sep) + os.sep for folder in unreadable)
        removed = [path for path in known if path not in keep and not path.startswith(unreadable_prefixes)]
        return jobs, removed

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

    def run(self, roots: Sequence[Path]) -> Summary:
        start = time.perf_counter()
        self.check_model_given()
        jobs, removed = self.plan(roots)
        self.summary.seconds["plan"] = time.perf_counter() - start
        if jobs:
            self._process(jobs)
        self._commit(force=True)
        # Swept last, so that a renamed file can still reuse the vectors stored under its old path.
        self.store.commit(removed=removed)
        self.summary.removed = len(removed)
        write_start = time.perf_counter()
        self.store.write_faiss()
        self._write_seconds += time.perf_counter() - write_start
        self.summary.images = self.store.count()
        self.summary.seconds.update(encode=self._encode_seconds, write=self._write_seconds,
                                    total=time.perf_counter() - start)
        return self.summary

    def _process(self, jobs: list[Job]) -> None:
        import torch

        model = self._load_model()
        # A batch holds 2.76 MB of pixels per image, in the queue and again in the model's input:
        # the batch is capped (a --batch-size of 100000 once took 5.7 GB for 400 tiny images),
        # and every batch is its own transaction, so commits stay frequent whatever is asked.
        self.batch_size = min(self.batch_size or (64 if model.device.type == "cuda" else 8), MAX_BATCH_SIZE)
        workers = self.options.workers if self.options.workers is not None else min(8, max(1, (os.cpu_count() or 2) - 1))
        dataset = FileDataset(jobs, preprocess=model.preprocess, db_path=self.store.folder / DB_NAME,
                              frames=self.options.frames, max_megapixels=self.options.max_megapixels,
                              patient_key=self.store.patient_key())
        self._dataset = dataset
        prefetch = max(2, self.batch_size // (max(workers, 1) * FILES_PER_HANDOVER))
        decode_seconds, position = 0.0, 0

        def take(item: dict[str, Any]) -> None:
            nonlocal decode_seconds, position
            decode_seconds += item["seconds"]
            position += 1
            self._take(item)
            if len(self._queue) >= self.batch_size:
                self._encode_queue(torch)
            self._commit(force=False)
            self.progress(position, len(jobs), self.summary.encoded)

        while position < len(jobs):
            try:
                for items in _loader(dataset, range(position, len(jobs)), workers, prefetch):
                    for item in items:
                        take(item)
            except RuntimeError as e:
                if "DataLoader worker" not in str(e):
                    raise
                # A decoder crashed its process (a segfault in a codec, the OOM killer). Find the
                # file among those in flight by decoding each in a process of its own, then go on.
                log.warning("a decoding process died (%s); isolating the files in flight", e)
                in_flight = max(workers, 1) * prefetch * FILES_PER_HANDOVER
                for i in range(position, min(len(jobs), position + in_flight)):
                    try:
                        (item,) = next(iter(_loader(dataset, [i], 1, 1)))
                    except RuntimeError as again:
                        if "DataLoader worker" not in str(again):
                            raise
                        item = {"job": jobs[i], "content_hash": None, "kind": "skip", "seconds": 0.0,
                                "error": "crashed the decoder (its process died)"}
                    take(item)
        if self._queue:
            self._encode_queue(torch)
        self.summary.seconds["read_decode_in_workers"] = decode_seconds

    def _take(self, item: dict[str, Any]) -> None:
        job: Job = item["job"]
        record = {"path": job.path, "size": job.size, "mtime_ns": job.mtime_ns, "content_hash": item["content_hash"]}
        if item["kind"] == "skip":
            self._pending_skipped.append({**record, "error": item["error"], "retry": item.get("retry", False)})
            self.summary.skipped += 1
            self.summary.skipped_files.append({"path": job.path, "reason": item["error"]})
        elif item["kind"] == "reuse":
            rows = self.store.images_with_hash(item["content_hash"])
            if not rows:  # removed meanwhile: decode it here after all
                return self._take(self._dataset.load(job, reuse_known=False))
            images = [{**row, "embedding": np.frombuffer(row["embedding"], np.float32)} for row in rows]
            self._pending_indexed.append({**record, "images": images})
            self.summary.reused += 1
        else:
            meta = item["metadata"]
            images = [{**meta, "frame": index, "width": w, "height": h, "embedding": None}
                      for index, w, h in item["frames"]]
            self._waiting[job.path] = {**record, "images": images, "left": len(images)}
            self._queue.extend((job.path, position, pixels) for position, pixels in enumerate(item["pixels"]))

    def _encode_queue(self, torch) -> None:
        batch, self._queue = self._queue[:self.batch_size], self._queue[self.batch_size:]
        start = time.perf_counter()
        embeddings = self.model.encode_resized([pixels for _, _, pixels in batch])
        self._encode_seconds += time.perf_counter() - start
        self.summary.encoded += len(batch)
        for (path, position, _), embedding in zip(batch, embeddings):
            waiting = self._waiting[path]
            waiting["images"][position]["embedding"] = embedding
            waiting["left"] -= 1
            if waiting["left"] == 0:
                self._pending_indexed.append(self._waiting.pop(path))
        self._commit(force=True)
        if len(self._queue) >= self.batch_size:
            self._encode_queue(torch)

    def _commit(self, force: bool) -> None:
        pending = len(self._pending_indexed) + len(self._pending_skipped)
        if pending and (force or pending >= COMMIT_EVERY):
            start = time.perf_counter()
            self.store.commit(indexed=self._pending_indexed, skipped=self._pending_skipped)
            self._write_seconds += time.perf_counter() - start
            self._pending_indexed, self._pending_skipped = [], []


