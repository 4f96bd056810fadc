"""What the index does not store about a file but a duplicate report wants to say: its DICOM
transfer syntax (read from the file meta header only) and a digest of its decoded pixels. Both
read files on disk; PACS instances and files gone since indexing give None."""
from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np

from indexer.pacs_keys import is_pacs_url


def transfer_syntax(path: str) -> str | None:
    """The file's Transfer Syntax UID (e.g. 1.2.840.10008.1.2.4.90 for JPEG 2000 lossless),
    None for a non-DICOM file, a PACS key or an unreadable file."""
    if is_pacs_url(path) or not os.path.isfile(path):
        return None
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        return None
    value = meta.get("TransferSyntaxUID")
    return str(value) if value else None


def syntax_name(uid: str | None) -> str | None:
    """A transfer syntax UID's name ("JPEG 2000 Image Compression (Lossless Only)")."""
    if not uid:
        return None
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def pixel_digest(path: str, frame: int = 0) -> str | None:
    """BLAKE2b of one frame's decoded pixel values (with their shape and type), the same for
    a file and its lossless re-encoding; None where the file cannot be read here."""
    if is_pacs_url(path) or not os.path.isfile(path):
        return None
    try:
        array = _pixels(path, frame)
    except Exception:  # noqa: BLE001 - any decoder failure: no digest, the report says "unknown"
        return None
    if array is None:
        return None
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.shape}|{array.dtype.str}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _pixels(path: str, frame: int) -> np.ndarray | None:
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        import pydicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                from pydicom.pixels import pixel_array
                return pixel_array(ds, index=frame)
            return ds.pixel_array
    from PIL import Image

    with Image.open(path) as image:
        if frame:
            image.seek(frame)
        return np.asarray(image)
