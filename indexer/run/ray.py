"""Distributed encoding on Ray Data (`mi-index PATHS --ray [ADDRESS]`).

This process plans the run, and alone holds the index: it lists the source, decides what is
new, changed or gone, and commits every result exactly as a local run does (so a killed run
resumes the same way). Only the new and changed items go to the cluster:

    plan (here) -> read, hash, decode, resize: CPU tasks, FILES_PER_HANDOVER items each
                -> encode: a pool of model actors (one GPU each; CPU actors without GPUs),
                   each loading the model once
                -> Resized pixels come back as Encoded vectors, streamed to the writer (here)

What the workers must reach: the items (a shared file system mounted at the same paths, or the
PACS for a DICOMweb source) and the model (the same folder path on every node, or the Hugging
Face hub / its cache). The index itself never leaves this machine. Content the index held
before the run is recognised by its hash and not decoded again (its vectors are reused).

The model is only described here (its identity and input size, from its header and config):
the actors load it. Ray is an optional extra (`pip install ".[ray]"`); only the pipeline imports
this module, for a Ray run.
"""
from __future__ import annotations

import dataclasses
import logging
import pickle
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ClusterError
from ..sources import Item
from .encode import model_header
from .workers import FILES_PER_HANDOVER, DecodingDataset, Encoded, Outcome, Resized

if TYPE_CHECKING:
    from ..options import IndexOptions, RunSettings
    from ..store import IndexStore

log = logging.getLogger(__name__)
LOCAL = "local"  # --ray without an address: RAY_ADDRESS if set, else a cluster on this machine


class RayExecutor:
    """Decodes in CPU tasks and encodes in a pool of model actors on the Ray cluster at
    `options.ray`; the model is only described here (identity, input size), never loaded."""

    commits_each_group = True  # a group is what one encoding call made: committed at once, as locally
    timing = "on_ray"

    def __init__(self, model: Any, store: IndexStore, options: IndexOptions):
        self.model = model_header(model, store)
        self.preprocess = self.model.preprocess
        self.options = options
        self.known = store.content_hashes()  # a worker elsewhere cannot open the index
        self.ray = connect(options.ray or LOCAL)
        gpus = int(self.ray.cluster_resources().get("GPU", 0))
        self.use_gpu = gpus > 0 and options.device != "cpu"
        self.device_type = "cuda" if self.use_gpu else "cpu"
        self.actors = options.ray_actors or (gpus if self.use_gpu else 1)

    def encoder(self, settings: RunSettings, on_batch: Any) -> None:
        return None  # the actors encode: outcomes come back Encoded

    def outcomes(self, dataset: DecodingDataset, settings: RunSettings) -> Iterator[list[Outcome]]:
        """Every item of `dataset` as an outcome (Encoded, Reused or Skipped), in groups as the
        encoding actors finish them, in no particular order."""
        ray = self.ray
        # The items travel as rows; the stage needs only its settings
        worker_decoding = dataclasses.replace(dataset, items=(), known=self.known)
        rows = [{"key": item.key, "size": item.size, "mtime_ns": item.mtime_ns} for item in dataset.items]
        blocks = max(1, min(len(rows) // FILES_PER_HANDOVER, 200))
        # scheduling_strategy and max_restarts are "deprecated" remote arguments until Ray 2.64
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # SPREAD: decoding runs over every node, and is not fused into the encoding actors
            decoded = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
                _decode_rows, fn_kwargs={"decoding": worker_decoding}, batch_size=FILES_PER_HANDOVER,
                batch_format="numpy", num_cpus=1, scheduling_strategy="SPREAD")
            # max_restarts=0: a failed actor fails the run (resumable: nothing uncommitted is lost), and
            # Ray does not warn on stderr that a restarted one could lose its constructor arguments.
            encoded = decoded.map_batches(
                EncodingActor, fn_constructor_kwargs={"model_source": self.model.source, "dtype": self.options.dtype,
                                                      "device": self.device_type, "compile_model": settings.compile},
                max_restarts=0, batch_size=settings.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self.actors), num_gpus=1 if self.use_gpu else 0, num_cpus=1)
        try:
            for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
                yield [pickle.loads(blob) for blob in batch["outcome"]]
        except ray.exceptions.RayError as error:
            raise ClusterError(f"the Ray run failed: {_last_line(error)}") from None


def connect(address: str = LOCAL) -> Any:
    """Ray, initialised once: connected to `address`, or (LOCAL) to RAY_ADDRESS or a new local
    cluster. ClusterError, one line, when Ray is missing or the cluster cannot be reached."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ClusterError('--ray needs Ray: pip install "medimageinsight-search[ray]"') from None
    # Ray's own chatter (token notices, "execution finished") stays off stderr: mi-index prints
    # its own progress and summary; errors still surface as ClusterError.
    for name in ("ray", "ray.data", "ray._private"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=None if address == LOCAL else address, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ClusterError(f"cannot reach the Ray cluster at {address}: {_last_line(error)}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # mi-index draws its own
    context.print_on_execution_start = False
    return ray


def _check_reachable(address: str) -> None:
    """A cluster address that does not answer fails here at once: Ray itself would retry for
    minutes before giving up."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == LOCAL or address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as error:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {error.strerror or error}") from None


def _decode_rows(batch: dict[str, np.ndarray], decoding: DecodingDataset) -> dict[str, np.ndarray]:
    """A CPU task: read, hash and decode a few items (the same code as a local worker)."""
    outcomes = [decoding.load(Item(str(key), int(size), int(mtime_ns)))
                for key, size, mtime_ns in zip(batch["key"], batch["size"], batch["mtime_ns"])]
    return {"outcome": np.array([pickle.dumps(outcome) for outcome in outcomes], dtype=object)}


class EncodingActor:
    """A model loaded once per actor; turns the Resized records of a batch into Encoded ones."""

    def __init__(self, model_source: str, device: str, dtype: str | None, compile_model: bool = False) -> None:
        from encoders import load_model
        self.model = load_model(model_source, device=device, dtype=dtype, towers=("image",))
        if compile_model:
            self.model.compile()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = [pickle.loads(blob) for blob in batch["outcome"]]
        pixels = [picture for outcome in outcomes if isinstance(outcome, Resized) for picture in outcome.pixels]
        vectors = self.model.encode_resized(pixels) if pixels else np.zeros((0, self.model.dim), np.float32)
        out, at = [], 0
        for outcome in outcomes:
            if isinstance(outcome, Resized):
                count = len(outcome.pixels)
                outcome = Encoded(outcome.item, outcome.content_hash, outcome.metadata, outcome.frames,
                                  vectors[at:at + count], outcome.seconds)
                at += count
            out.append(pickle.dumps(outcome))
        return {"outcome": np.array(out, dtype=object)}


def _last_line(error: BaseException) -> str:
    """The last non-blank line of an error's message: where Ray puts the cause, after its traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
