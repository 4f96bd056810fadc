"""How a run of mi-index works: one frozen object, built once (from the command line or the
API's keywords) and read by the pipeline."""
from __future__ import annotations

from dataclasses import dataclass

FRAMES_CHOICES = ("middle", "all")


@dataclass(frozen=True)
class IndexOptions:
    """batch_size: images per model call (None: 64 on CUDA, 8 on CPU; capped at 256);
    workers: decoding processes (None: cores - 1, at most 8; 0: in this process); device and
    dtype: as encoders.load_model; max_megapixels: larger images are skipped (decompression
    bombs); frames: "middle" or "all" frames of multi-frame files; ray: None for this machine,
    else a Ray cluster's address or "local" (RAY_ADDRESS, else a new local cluster) to decode
    and encode on (indexer.distributed); ray_actors: encoding actors there (None: one per GPU,
    or one CPU actor without GPUs); faiss_memory: the FAISS index's memory budget in GB, kept
    in the index (None: leave it as it is; 0: no budget); fast_j2k: decode JPEG 2000 DICOM
    images of at least twice the model's input at a reduced resolution level (faster, not exact)."""

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

    def __post_init__(self) -> None:
        if self.frames not in FRAMES_CHOICES:
            raise ValueError(f"frames must be one of {FRAMES_CHOICES}, not {self.frames!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise ValueError("workers must be 0 or more")
        if self.max_megapixels <= 0:
            raise ValueError("max_megapixels must be positive")
