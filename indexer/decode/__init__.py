"""Files -> 8-bit pixels: `decode_bytes` turns the bytes of one file into one or more 8-bit
PIL images ("L" or "RGB") plus the DICOM metadata the index keeps (`DecodedFile`). Anything that
cannot be decoded raises `DecodeError` with a short, human-readable reason; the indexer records
it and moves on. Plain images: `images`; DICOM: `dicom` (and `j2k` for --fast-j2k)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..options import FRAMES_CHOICES  # one list of the frame choices
from .base import DecodedFile, DecodeError, TransientDecodeError
from .dicom import colour_to_8bit, decode_dicom, dicom_metadata, transfer_syntax
from .images import DICOM_SUFFIXES, IMAGE_SUFFIXES, decode_image, sniff_kind
from .j2k import reduction_level


def content_hash(data: bytes) -> str:
    """Identity of a file's content (renamed or copied files reuse their stored vectors)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_bytes(data: bytes, path: Path, *, frames: str = "middle", max_megapixels: float = 100.0,
                 patient_key: bytes | None = None, kind: str | None = None,
                 j2k_reduce_to: int | None = None) -> DecodedFile:
    """Decode one file's bytes. Raises DecodeError with the reason when it cannot be indexed.
    `patient_key`: the key of PatientID's pseudonym (see indexer.privacy); None stores none.
    `kind`: "dicom" where the source knows (a PACS), else sniffed from the name and bytes.
    `j2k_reduce_to`: decode a grey JPEG 2000 DICOM image at least twice this size (pixels, the
    shorter side) at a reduced resolution level that stays at least this size: 4x to 18x
    faster, not exact (see `j2k.reduced_j2k`); None decodes every image exactly."""
    if frames not in FRAMES_CHOICES:
        raise ValueError(f"frames must be one of {FRAMES_CHOICES}, not {frames!r}")
    if not data:
        raise DecodeError("empty file")
    kind = kind or sniff_kind(path, data[:132])
    if kind == "dicom":
        return decode_dicom(data, frames, max_megapixels, patient_key, j2k_reduce_to)
    if kind == "image":
        return decode_image(data, frames, max_megapixels)
    raise DecodeError("not an image or DICOM file")


def decode_file(path: Path | str, **kwargs) -> DecodedFile:
    """`decode_bytes` on a file from disk; an unreadable file is a DecodeError too."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DecodeError(f"unreadable: {e.strerror or e}") from None
    return decode_bytes(data, path, **kwargs)


__all__ = ["DICOM_SUFFIXES", "IMAGE_SUFFIXES", "DecodeError", "DecodedFile", "TransientDecodeError", "content_hash",
           "colour_to_8bit", "decode_bytes", "decode_file", "dicom_metadata", "reduction_level", "sniff_kind",
           "transfer_syntax"]
