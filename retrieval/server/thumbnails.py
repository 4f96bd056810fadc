"""The thumbnails the page shows: a PNG of an indexed image, rendered once and cached beside the index."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

THUMBNAIL_SIZE = 256  # pixels, the longer side at most


def thumbnail_png(searcher: Any, index_dir: Path, image_id: int) -> bytes:
    """The thumbnail of an indexed image, from the cache folder or rendered once (DICOM with the indexing
    windowing; an image indexed from a PACS retrieved from it). QueryError when it cannot be rendered."""
    fields = searcher.image(image_id)
    cached = index_dir / "thumbnails" / f"{image_id}.png"
    if cached.exists():
        return cached.read_bytes()
    decoded = _decoded(fields, image_id)
    from PIL import Image

    frames = dict(decoded.frames)
    picture = frames.get(fields.get("frame") or 0) or decoded.frames[0][1]
    picture = picture.copy()
    picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    from indexer.private_files import private_folder, write_private

    try:  # a cache only: a read-only index still serves thumbnails
        private_folder(cached.parent)  # 0700, its files 0600: pictures of patients
        temporary = cached.with_suffix(f".{os.getpid()}.tmp")
        write_private(temporary, buffer.getvalue())
        os.replace(temporary, cached)
    except OSError:
        pass
    return buffer.getvalue()


def _decoded(fields: dict[str, Any], image_id: int) -> Any:
    """The indexed file decoded again: from its path, or from the PACS it was indexed from (MI_DICOMWEB_* login,
    MI_DIMSE_AET)."""
    from indexer.decode import DecodeError, decode_bytes, decode_file
    from indexer.errors import MIError
    from indexer.pacs_keys import is_dicomweb_url, is_dimse_url

    from ..errors import QueryError

    frames = "all" if fields.get("frame") else "middle"
    try:
        if is_dicomweb_url(fields["path"]):
            from indexer.sources.dicomweb import read_instance
        elif is_dimse_url(fields["path"]):
            from indexer.sources.dimse import read_instance
        else:
            return decode_file(fields["path"], frames=frames)
        return decode_bytes(read_instance(fields["path"]), Path("instance.dcm"), frames=frames, kind="dicom")
    except (DecodeError, MIError, OSError) as error:
        raise QueryError(f"cannot render image {image_id}: {error}") from None
