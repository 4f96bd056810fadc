"""DICOM files through pydicom: their frames as 8-bit images, and the metadata the index keeps.

Pixel pipeline (PS3.4 grayscale pipeline, simplified):
modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence) -> VOI LUT Sequence, else the
first WindowCenter/WindowWidth pair, else the full range of the frame -> 8 bits ->
MONOCHROME1 inverted. Colour images (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR
through its lookup table) are scaled from their bit depth to 8 bits.
"""
from __future__ import annotations

import io
import warnings
from datetime import date

import numpy as np
from PIL import Image, ImageOps

from ..errors import REASON_LIMIT, one_line
from ..privacy import pseudonym
from .bounds import RefusedInput, check_frames, inflate_deflated_dicom
from .dicom_values import element_text
from .base import DecodedFile, DecodeError, TransientDecodeError, check_size, is_fatal, to_8bit_image
from .j2k import reduced_j2k

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


def _grey_to_8bit(arr: np.ndarray, ds) -> Image.Image:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        lut_item = ds.VOILUTSequence[0]
        lut = np.asarray(lut_item.LUTData, dtype=np.float64)
        if np.array_equal(arr, np.round(arr)):            # the LUT is indexed by stored integers
            arr = arr.astype(np.int64)
        voi = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
        image = to_8bit_image(voi, lut.min(), lut.max())
    elif "WindowCenter" in ds and "WindowWidth" in ds and _first(ds.WindowWidth) >= 1:
        # Linear VOI function of PS3.3 C.11.2.1.2.1 with the first window.
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        image = to_8bit_image(arr, lo, hi)
    else:
        image = to_8bit_image(arr)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        image = ImageOps.invert(image)
    return image


def colour_to_8bit(arr: np.ndarray, ds) -> Image.Image:
    from pydicom.pixels import apply_color_lut

    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    return to_8bit_image(arr, 0.0, float(2 ** bits - 1))


def transfer_syntax(ds):
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


def decode_dicom(data: bytes, frames: str, max_megapixels: float, patient_key: bytes | None,
                 j2k_reduce_to: int | None = None) -> DecodedFile:
    """One DICOM file's frames (the middle one, or all) and metadata; DecodeError with the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every oddity it tolerates
        return _decode_dicom(data, frames, max_megapixels, patient_key, j2k_reduce_to)


def _decode_dicom(data: bytes, frames: str, max_megapixels: float, patient_key: bytes | None,
                  j2k_reduce_to: int | None) -> DecodedFile:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import get_decoder, pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(inflate_deflated_dicom(data, max_megapixels)), force=True)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise DecodeError("DICOM without pixel data")
        if "Rows" not in ds or "Columns" not in ds:
            raise DecodeError("corrupt DICOM: no Rows/Columns")
        syntax = transfer_syntax(ds)
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
        check_size(columns, rows, len(wanted), max_megapixels)
        check_frames(ds, str(syntax), wanted, n_frames, max_megapixels)
        images = []
        for index in wanted:
            arr = reduced_j2k(ds, syntax, index, n_frames, j2k_reduce_to) if j2k_reduce_to else None
            if arr is None:
                arr = pixel_array(ds, index=index if n_frames > 1 else None)
            if arr.ndim == 3 and arr.shape[-1] != 3 and n_frames == 1:
                arr = arr[0]
            if arr.ndim == 3 or ds.get("PhotometricInterpretation") == "PALETTE COLOR":
                images.append((index, colour_to_8bit(arr, ds)))
            else:
                images.append((index, _grey_to_8bit(arr, ds)))
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
        if is_fatal(e):
            raise
        raise DecodeError(f"truncated or corrupt DICOM: {one_line(e, REASON_LIMIT)}") from None
    return DecodedFile(source_format="dicom", frames=images, metadata=dicom_metadata(ds, patient_key))
