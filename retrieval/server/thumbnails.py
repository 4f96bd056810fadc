"""The thumbnails the page shows: a PNG of an indexed image, rendered once on a bounded pool of its own (a slow
PACS must not hold the threads that answer searches) and cached beside the index under what it shows: the
index's identity, the image's content hash and frame (never its id alone: ids of a rebuilt index name other
pictures)."""
from __future__ import annotations

import asyncio
import io
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from fastapi import HTTPException

THUMBNAIL_SIZE = 256   # pixels, the longer side at most
RENDER_THREADS = 4     # thumbnails rendered (or retrieved from a PACS) at once
RENDER_QUEUE = 64      # thumbnails waiting or rendering; more are answered 503 (Retry-After)
RETRY_AFTER_S = 2


class ThumbnailRenderer:
    """Renders on RENDER_THREADS threads of its own, at most RENDER_QUEUE at a time."""

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = index_dir
        self._pool = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="mi-thumbnail")
        self._slots = threading.BoundedSemaphore(RENDER_QUEUE)
        self._swept = threading.Event()

    async def png(self, searcher: Callable[[], Any], image_id: int) -> bytes:
        """The thumbnail of an indexed image; 503 when RENDER_QUEUE are already asked for."""
        if not self._slots.acquire(blocking=False):
            raise HTTPException(503, "too many thumbnails asked for at once: retry shortly",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await asyncio.wrap_future(self._pool.submit(self._render, searcher, image_id))
        finally:
            self._slots.release()

    def _render(self, searcher: Callable[[], Any], image_id: int) -> bytes:
        current = searcher()
        if not self._swept.is_set():
            self._swept.set()
            sweep_thumbnails(self.index_dir)
        return thumbnail_png(current, self.index_dir, image_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def thumbnail_png(searcher: Any, index_dir: Path, image_id: int) -> bytes:
    """The thumbnail of an indexed image, from the cache folder or rendered once (DICOM with the indexing
    windowing; an image indexed from a PACS retrieved from it). QueryError when it cannot be rendered."""
    fields = searcher.image(image_id)
    cached = _cache_path(index_dir, _index_id(index_dir), fields)
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
    _store(cached, buffer.getvalue())
    return buffer.getvalue()


def _cache_path(index_dir: Path, index_id: str, fields: dict[str, Any]) -> Path:
    return index_dir / "thumbnails" / f"{index_id}-{fields['content_hash']}-{int(fields.get('frame') or 0)}.png"


def _store(cached: Path, png: bytes) -> None:
    """Into the cache under a temporary name of this writer's own (mkstemp: 0600, pictures of patients), then
    renamed: a concurrent reader sees the whole file or none."""
    from indexer.private_files import private_folder

    try:  # a cache only: a read-only index still serves thumbnails
        private_folder(cached.parent)  # 0700
        fd, temporary = tempfile.mkstemp(dir=cached.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(png)
            os.replace(temporary, cached)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError:
        pass


_INDEX_IDS: dict[tuple[str, int], str] = {}  # (index folder, its database's inode) -> meta index_id


def _index_id(index_dir: Path) -> str:
    """The index's identity (meta index_id), read once per database file (a rebuilt index is another file)."""
    from indexer.store import DB_NAME, IndexStore

    key = (str(index_dir), os.stat(index_dir / DB_NAME).st_ino)
    if key not in _INDEX_IDS:
        with IndexStore.open(index_dir, readonly=True) as store:
            _INDEX_IDS[key] = store.index_id
    return _INDEX_IDS[key]


def sweep_thumbnails(index_dir: Path) -> None:
    """Thumbnails no image of the index shows any more removed (once per server): another index's (a rebuilt
    one), those of removed images, the old cache keyed by ids, writers' leftovers. Best effort."""
    from indexer.store import IndexStore

    folder = index_dir / "thumbnails"
    try:
        with IndexStore.open(index_dir, readonly=True) as store:
            index_id, hashes = store.index_id, store.content_hashes()
        for entry in folder.iterdir():
            owner, _, rest = entry.name.partition("-")
            if entry.is_file() and (owner != index_id or rest.rpartition("-")[0] not in hashes):
                entry.unlink()
    except Exception:  # noqa: BLE001 - a cache: never in the way of a thumbnail
        pass


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
