"""What every decoder shares: its errors, the record of one decoded file, the size guard and
the linear scaling of any array to an 8-bit image."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image


class DecodeError(Exception):
    """A file that cannot be indexed; `str(error)` is the reason shown to the user."""


class TransientDecodeError(DecodeError):
    """A failure of this run, not of the file (out of memory under a memory limit): the file is
    skipped now and tried again on the next run, even unchanged."""


def is_fatal(error: BaseException) -> bool:
    """Errors that must stop the program rather than cost one file. Everything else a decoder
    raises is the file's problem: pyo3's PanicException (a Rust panic in pylibjpeg-rle, say)
    derives from BaseException, not Exception."""
    return isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit))


@dataclass
class DecodedFile:
    """One decoded file: 8-bit images with their frame numbers, and metadata."""

    source_format: str                                   # "dicom", "png", "jpeg", "tiff", "bmp"
    frames: list[tuple[int, Image.Image]]                # (frame index, 8-bit "L" or "RGB" image)
    metadata: dict[str, str | None] = field(default_factory=dict)


def check_size(width: int, height: int, n_frames: int, max_megapixels: float) -> None:
    megapixels = width * height * n_frames / 1e6
    if megapixels > max_megapixels:
        raise DecodeError(f"too big: {megapixels:.0f} megapixels > --max-megapixels {max_megapixels:g}")


def to_8bit_image(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> Image.Image:
    """Scale a grey (H, W) or colour (H, W, 3) array linearly from [lo, hi] (default: its range)."""
    arr = np.asarray(arr)
    floating = arr.dtype.kind == "f"
    arr = arr.astype(np.float32, copy=False)  # exact for 16-bit values; 8 bits come out anyway
    lo = float(np.nanmin(arr) if floating else arr.min()) if lo is None else lo
    hi = float(np.nanmax(arr) if floating else arr.max()) if hi is None else hi
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DecodeError("corrupt image: no finite pixel values")
    if hi <= lo:
        scaled = np.zeros(arr.shape, np.float32)
    else:
        scaled = (arr - np.float32(lo)) * np.float32(255.0 / (hi - lo))  # a new array: in place below
    if floating:
        np.nan_to_num(scaled, copy=False)
    np.rint(np.clip(scaled, 0, 255, out=scaled), out=scaled)
    out = scaled.astype(np.uint8)
    return Image.fromarray(out, "RGB" if out.ndim == 3 else "L")
