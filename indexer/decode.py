"""Files -> 8-bit pixels: PNG/JPEG/TIFF/BMP through Pillow, DICOM through pydicom.

`decode_bytes` turns the bytes of one file into one or more 8-bit PIL images ("L" or "RGB")
plus the DICOM metadata the index keeps. Anything that cannot be decoded raises
`DecodeError` with a short, human-readable reason; the indexer records it and moves on.

DICOM pixel pipeline (PS3.4 grayscale pipeline, simplified):
modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence) -> VOI LUT Sequence, else the
first WindowCenter/WindowWidth pair, else the full range of the frame -> 8 bits ->
MONOCHROME1 inverted. Colour images (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR
through its lookup table) are scaled from their bit depth to 8 bits.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .bounds import RefusedInput, check_frames, inflate_deflated_dicom
from .dicom_values import element_text
from .errors import REASON_LIMIT, one_line
from .privacy import pseudonym

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # JPEG opens MPO files too
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")

from .options import FRAMES_CHOICES  # one list of the frame choices


class DecodeError(Exception):
    """A file that cannot be indexed; `str(error)` is the reason shown to the user."""


class TransientDecodeError(DecodeError):
    """A failure of this run, not of the file (out of memory under a memory limit): the file is
    skipped now and tried again on the next run, even unchanged."""


def _is_fatal(error: BaseException) -> bool:
    """Errors that must stop the program rather than cost one file. Everything else a decoder
    raises is the file's problem: pyo3's PanicException (a Rust panic in pylibjpeg-rle, say)
    derives from BaseException, not Exception."""
    return isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit))


@dataclass
class Decoded:
    """One decoded file: 8-bit images with their frame numbers, and metadata."""

    source_format: str                                   # "dicom", "png", "jpeg", "tiff", "bmp"
    frames: list[tuple[int, Image.Image]]                # (frame index, 8-bit "L" or "RGB" image)
    metadata: dict[str, str | None] = field(default_factory=dict)


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


def content_hash(data: bytes) -> str:
    """Identity of a file's content (renamed or copied files reuse their stored vectors)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_bytes(data: bytes, path: Path, *, frames: str = "middle", max_megapixels: float = 100.0,
                 patient_key: bytes | None = None, kind: str | None = None,
                 j2k_reduce_to: int | None = None) -> Decoded:
    """Decode one file's bytes. Raises DecodeError with the reason when it cannot be indexed.
    `patient_key`: the key of PatientID's pseudonym (see indexer.privacy); None stores none.
    `kind`: "dicom" where the source knows (a PACS), else sniffed from the name and bytes.
    `j2k_reduce_to`: decode a grey JPEG 2000 DICOM image at least twice this size (pixels, the
    shorter side) at a reduced resolution level that stays at least this size: 4x to 18x
    faster, not exact (see `_reduced_j2k`); None decodes every image exactly."""
    if frames not in FRAMES_CHOICES:
        raise ValueError(f"frames must be one of {FRAMES_CHOICES}, not {frames!r}")
    if not data:
        raise DecodeError("empty file")
    kind = kind or sniff_kind(path, data[:132])
    if kind == "dicom":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every oddity it tolerates
            return _decode_dicom(data, frames, max_megapixels, patient_key, j2k_reduce_to)
    if kind == "image":
        return _decode_image(data, frames, max_megapixels)
    raise DecodeError("not an image or DICOM file")


def decode_file(path: Path | str, **kwargs) -> Decoded:
    """`decode_bytes` on a file from disk; an unreadable file is a DecodeError too."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DecodeError(f"unreadable: {e.strerror or e}") from None
    return decode_bytes(data, path, **kwargs)


# ---------------------------------------------------------------- plain images (Pillow)

def _check_size(width: int, height: int, n_frames: int, max_megapixels: float) -> None:
    megapixels = width * height * n_frames / 1e6
    if megapixels > max_megapixels:
        raise DecodeError(f"too big: {megapixels:.0f} megapixels > --max-megapixels {max_megapixels:g}")


def _to_8bit_image(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> Image.Image:
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


def _pil_frame_to_8bit(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "RGB"):
        return img.copy()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _to_8bit_image(np.asarray(img))          # 16/32-bit grey: its own full range
    if img.mode in ("1", "LA", "La"):
        return img.convert("L")
    return img.convert("RGB")                         # P, RGBA, CMYK, YCbCr, ...


def _decode_image(data: bytes, frames: str, max_megapixels: float) -> Decoded:
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
            _check_size(img.width, img.height, len(wanted), max_megapixels)
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
        if _is_fatal(e):
            raise
        raise DecodeError(f"the image decoder failed: {one_line(e, REASON_LIMIT)}") from None
    return Decoded(source_format=(img.format or "image").lower().replace("mpo", "jpeg"), frames=decoded)


# ---------------------------------------------------------------- DICOM (pydicom)

_METADATA_KEYWORDS = {
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
    "series_description": "SeriesDescription",
    "patient_sex": "PatientSex",
    "patient_age": "PatientAge",
    "sop_instance_uid": "SOPInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
}


def _text(ds, keyword: str) -> str | None:
    return element_text(ds, keyword)  # only a value that fits its VR: never one run over the next elements


def _iso_date(value: str | None) -> str | None:
    if not value or len(value) < 8 or not value[:8].isdigit():
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8])).isoformat()
    except ValueError:
        return None


def dicom_metadata(ds, patient_key: bytes | None) -> dict[str, str | None]:
    """The fields the index keeps. Never names or birth dates; PatientID only as a keyed
    pseudonym (none without a key)."""
    meta = {name: _text(ds, keyword) for name, keyword in _METADATA_KEYWORDS.items()}
    meta["study_date"] = _iso_date(_text(ds, "StudyDate"))
    meta["patient_hash"] = pseudonym(_text(ds, "PatientID"), patient_key) if patient_key else None
    return meta


def _first(value) -> float:
    """First value of a possibly multi-valued numeric element."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _grey_to_8bit(arr: np.ndarray, ds, index: int) -> Image.Image:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        lut_item = ds.VOILUTSequence[0]
        lut = np.asarray(lut_item.LUTData, dtype=np.float64)
        if np.array_equal(arr, np.round(arr)):            # the LUT is indexed by stored integers
            arr = arr.astype(np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            voi = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
        image = _to_8bit_image(voi, lut.min(), lut.max())
    elif "WindowCenter" in ds and "WindowWidth" in ds and _first(ds.WindowWidth) >= 1:
        # Linear VOI function of PS3.3 C.11.2.1.2.1 with the first window.
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        image = _to_8bit_image(arr, lo, hi)
    else:
        image = _to_8bit_image(arr)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        image = ImageOps.invert(image)
    return image


def _colour_to_8bit(arr: np.ndarray, ds) -> Image.Image:
    from pydicom.pixels import apply_color_lut

    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    return _to_8bit_image(arr, 0.0, float(2 ** bits - 1))


def _transfer_syntax(ds):
    """The dataset's transfer syntax; for files without one (no or broken file meta), the
    encoding pydicom found while reading, so their uncompressed pixels still decode."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return meta.TransferSyntaxUID
    implicit, little = ds.original_encoding
    syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    return syntax


def _decode_dicom(data: bytes, frames: str, max_megapixels: float, patient_key: bytes | None,
                  j2k_reduce_to: int | None = None) -> Decoded:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import get_decoder, pixel_array

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")               # pydicom warns on every oddity it tolerates
            ds = pydicom.dcmread(io.BytesIO(inflate_deflated_dicom(data, max_megapixels)), force=True)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise DecodeError("DICOM without pixel data")
        if "Rows" not in ds or "Columns" not in ds:
            raise DecodeError("corrupt DICOM: no Rows/Columns")
        syntax = _transfer_syntax(ds)
        if syntax.is_compressed:
            try:
                available = get_decoder(syntax).is_available
            except NotImplementedError:
                available = False
            if not available:
                raise DecodeError(f"unsupported transfer syntax: {syntax.name}")
        rows, columns = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        wanted = list(range(n_frames)) if frames == "all" else [n_frames // 2]
        _check_size(columns, rows, len(wanted), max_megapixels)
        check_frames(ds, str(syntax), wanted, n_frames, max_megapixels)
        images = []
        for index in wanted:
            arr = _reduced_j2k(ds, syntax, index, n_frames, j2k_reduce_to) if j2k_reduce_to else None
            if arr is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    arr = pixel_array(ds, index=index if n_frames > 1 else None)
            if arr.ndim == 3 and arr.shape[-1] != 3 and n_frames == 1:
                arr = arr[0]
            if arr.ndim == 3 or ds.get("PhotometricInterpretation") == "PALETTE COLOR":
                images.append((index, _colour_to_8bit(arr, ds)))
            else:
                images.append((index, _grey_to_8bit(arr, ds, index)))
    except DecodeError:
        raise
    except RefusedInput as e:
        raise DecodeError(str(e)) from None
    except InvalidDicomError as e:
        raise DecodeError(f"corrupt DICOM: {one_line(e, REASON_LIMIT)}") from None
    except NotImplementedError as e:
        raise DecodeError(f"unsupported DICOM: {one_line(e, REASON_LIMIT)}") from None
    except MemoryError:
        raise TransientDecodeError("out of memory while decoding (tried again next run)") from None
    except BaseException as e:                          # pydicom and its codecs raise many types
        if _is_fatal(e):
            raise
        raise DecodeError(f"truncated or corrupt DICOM: {one_line(e, REASON_LIMIT)}") from None
    return Decoded(source_format="dicom", frames=images, metadata=dicom_metadata(ds, patient_key))


J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")  # JPEG 2000 lossless, and lossy


def reduction_level(rows: int, columns: int, target: int) -> int:
    """Resolution levels to drop (each halves both sides) so that the shorter side stays at
    least `target`: 0 below twice the target."""
    short = min(rows, columns)
    return max(0, (short // target).bit_length() - 1)


def _reduced_j2k(ds, syntax, index: int, n_frames: int, target: int) -> np.ndarray | None:
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

