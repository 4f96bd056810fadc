"""How a run of mi-index works: `IndexOptions`, as asked (from the command line or the API's
keywords), and `RunSettings`, the same settled against the device once (`settle`): every
default of a run is decided here (the batch per device is the encoder's, `encoders.defaults`)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from encoders.defaults import default_batch_size

FRAMES_CHOICES = ("middle", "all")


@dataclass(frozen=True)
class IndexOptions:
    """batch_size: images per model call (None: the encoder's default for the device,
    `encoders.defaults.default_batch_size`; capped at MAX_BATCH_SIZE); workers: decoding
    processes (None: cores - 1, at most 8; 0: in this process); device and dtype: as
    encoders.load_model (None: its defaults); max_megapixels: larger images are skipped
    (decompression bombs); frames: "middle" or "all" frames of
    multi-frame files; ray: None for this machine, else a Ray cluster's address or "local"
    (RAY_ADDRESS, else a new local cluster) to decode and encode on (indexer.run.ray); ray_actors:
    encoding actors there (None: one per GPU, or one CPU actor without GPUs); faiss_memory: the
    FAISS index's memory budget in GB, kept in the index (None: leave it as it is; 0: no budget);
    fast_j2k: decode JPEG 2000 DICOM images of at least twice the model's input at a reduced
    resolution level (faster, not exact); compile: "auto", "on" or "off": encode through
    torch.compile (see `compile_wanted`). `settle` turns them into a run's RunSettings."""

    batch_size: int | None = None
    workers: int | None = None
    device: str | None = None
    dtype: str | None = None
    max_megapixels: float = 100.0
    frames: str = "middle"
    ray: str | None = None
    ray_actors: int | None = None
    faiss_memory: float | None = None
    fast_j2k: bool = False
    compile: str = "auto"

    def __post_init__(self) -> None:
        if self.frames not in FRAMES_CHOICES:
            raise ValueError(f"frames must be one of {FRAMES_CHOICES}, not {self.frames!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise ValueError("workers must be 0 or more")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {COMPILE_CHOICES}, not {self.compile!r}")
        if self.max_megapixels <= 0:
            raise ValueError("max_megapixels must be positive")


def decoding_workers(workers: int | None) -> int:
    """The decoding processes a run uses: as asked, else one per core but one (left to the
    model), at most 8."""
    return workers if workers is not None else min(8, max(1, (os.cpu_count() or 2) - 1))


COMPILE_CHOICES = ("auto", "on", "off")
# Where "auto" compiles: on CUDA, for runs with this many images or more. Compiling costs about
# a minute up front (unmeasured here: no GPU was lent); on an H100 it saves 1.3 ms per image
# (490 against 300 images/s), so it pays for itself after roughly 46,000 images.
COMPILE_MIN_IMAGES = 50_000


def compile_wanted(choice: str, device_type: str, images: int) -> bool:
    """Whether a run encodes through torch.compile: "on", "off", or ("auto") on CUDA for runs
    of COMPILE_MIN_IMAGES or more. Not on the CPU: at its batch of 2 the compiled tower ran no
    faster than the eager one, whose fused oneDNN kernels do what Inductor would (0.99x, full-size
    float32 weights, `bench_encode.py --compile --batch-sizes 2 --wait-idle`)."""
    if choice == "auto":
        return device_type == "cuda" and images >= COMPILE_MIN_IMAGES
    return choice == "on"


# A batch holds 2.76 MB of pixels per image in the model's input: the batch is capped (a
# --batch-size of 100000 once took 5.7 GB for 400 tiny images), and every batch is its own
# transaction, so commits stay frequent whatever is asked.
MAX_BATCH_SIZE = 256  # about 0.7 GB of pixels


@dataclass(frozen=True)
class RunSettings:
    """What a run does, settled once from its IndexOptions and the device that encodes."""

    batch_size: int   # images per model call
    workers: int      # decoding processes (0: in this process)
    compile: bool     # encode through torch.compile


def settle(options: IndexOptions, device_type: str, images: int) -> RunSettings:
    """The settings of a run of `images` images encoded on a `device_type` ("cuda" or "cpu") device."""
    return RunSettings(batch_size=min(options.batch_size or default_batch_size(device_type), MAX_BATCH_SIZE),
                       workers=decoding_workers(options.workers),
                       compile=compile_wanted(options.compile, device_type, images))
