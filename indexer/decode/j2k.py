"""Grey JPEG 2000 DICOM frames decoded at a reduced resolution level (`mi-index --fast-j2k`):
4x to 18x faster than the exact decode, not exact."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")  # JPEG 2000 lossless, and lossy


def reduction_level(rows: int, columns: int, target: int) -> int:
    """Resolution levels to drop (each halves both sides) so that the shorter side stays at
    least `target`: 0 below twice the target."""
    short = min(rows, columns)
    return max(0, (short // target).bit_length() - 1)


def reduced_j2k(ds, syntax, index: int, n_frames: int, target: int) -> np.ndarray | None:
    """The stored values of one grey JPEG 2000 frame decoded at a reduced resolution level by
    OpenJPEG through Pillow (`reduce`), or None where the exact path must decode it (another
    syntax, colour, signed samples, an image under twice the target, a codec refusal).

    Pillow scales samples of fewer than 16 bits up to 16 (12-bit values come out 16x larger):
    shifted back here, so windowing sees the stored values."""
    if str(syntax) not in J2K_SYNTAXES or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    if int(ds.get("PixelRepresentation", 0)) != 0:
        return None
    level = reduction_level(int(ds.Rows), int(ds.Columns), target)
    if level == 0:
        return None
    from itertools import islice

    from pydicom.encaps import generate_frames
    try:
        codestream = next(islice(generate_frames(ds.PixelData, number_of_frames=n_frames), index, None))
        with Image.open(io.BytesIO(codestream)) as image:
            image.reduce = level
            image.load()
            arr = np.asarray(image)
    except (OSError, ValueError, StopIteration, SyntaxError):
        return None
    precision = _j2k_precision(codestream)
    if arr.dtype == np.uint16 and precision is not None and 8 < precision < 16:
        arr = arr >> (16 - precision)
    return arr


def _j2k_precision(codestream: bytes) -> int | None:
    """Bits per sample of the first component, from the SIZ marker segment (ISO 15444-1 A.5.1),
    which follows the SOC marker: Ssiz at byte 42 holds the precision minus one."""
    if len(codestream) < 43 or codestream[:4] != b"\xff\x4f\xff\x51":
        return None
    return (codestream[42] & 0x7F) + 1
