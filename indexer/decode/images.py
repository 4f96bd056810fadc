"""Plain image files through Pillow (PNG, JPEG, TIFF, BMP), and telling them and DICOM files
apart by name or first bytes (`sniff_kind`)."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import REASON_LIMIT, one_line
from .base import DecodedFile, DecodeError, TransientDecodeError, check_size, is_fatal, to_8bit_image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # JPEG opens MPO files too
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")


def sniff_kind(path: Path, head: bytes | None = None) -> str | None:
    """"dicom", "image" or None (not something we index), from the suffix or the first bytes.

    `head` is the first 132 bytes of the file when the caller has them; it is read otherwise,
    and only for files whose suffix says nothing (archives often have DICOM files without one).
    """
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except OSError:
            return None
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_IMAGE_MAGIC):
        return "image"
    return None


def _pil_frame_to_8bit(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "RGB"):
        return img.copy()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return to_8bit_image(np.asarray(img))          # 16/32-bit grey: its own full range
    if img.mode in ("1", "LA", "La"):
        return img.convert("L")
    return img.convert("RGB")                         # P, RGBA, CMYK, YCbCr, ...


def decode_image(data: bytes, frames: str, max_megapixels: float) -> DecodedFile:
    # --max-megapixels is the one guard: Pillow's own (89.5 MP) would otherwise refuse images the
    # user allowed, as a "decompression bomb". Pillow warns above the limit (an error here) and
    # raises above twice it, before allocating anything.
    Image.MAX_IMAGE_PIXELS = max(int(max_megapixels * 1e6), 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            n_frames = getattr(img, "n_frames", 1)
            wanted = range(n_frames) if frames == "all" else [n_frames // 2]
            check_size(img.width, img.height, len(wanted), max_megapixels)
            decoded = []
            for index in wanted:
                img.seek(index)
                frame = ImageOps.exif_transpose(img) if index == 0 else img
                frame.load()
                decoded.append((index, _pil_frame_to_8bit(frame)))
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecodeError(f"too big: over --max-megapixels {max_megapixels:g}") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image or DICOM file") from None
    except MemoryError:
        raise TransientDecodeError("out of memory while decoding (tried again next run)") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError) as e:
        raise DecodeError(f"truncated or corrupt image: {one_line(e, REASON_LIMIT)}") from None
    except BaseException as e:
        if is_fatal(e):
            raise
        raise DecodeError(f"the image decoder failed: {one_line(e, REASON_LIMIT)}") from None
    return DecodedFile(source_format=(img.format or "image").lower().replace("mpo", "jpeg"), frames=decoded)
