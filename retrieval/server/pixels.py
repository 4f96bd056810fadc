"""The viewer's pixels: an indexed image decoded again from its original values (DICOM stored values through the
modality LUT, Hounsfield units for CT), its own windows, and PNGs rendered at any window/level and size.

The decoded arrays are kept in a small in-memory LRU (bounded in bytes), so dragging the window re-renders a
2500x2048 image without decoding it again. The defaults are the indexer's (indexer.decode): a VOI LUT Sequence,
else the first WindowCenter/WindowWidth, else the full range; MONOCHROME1 is inverted."""
from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_MEGAPIXELS = 100.0          # as mi-index's default: larger files were never indexed
CACHE_BYTES = 512 << 20         # decoded arrays kept in memory, all together
MAX_RENDER_SIZE = 8192          # pixels, the longer side of a rendered PNG


@dataclass
class Pixels:
    """One image's values for the viewer. `values`: float32 (H, W) grey after the modality LUT, or uint8
    (H, W, 3) colour (not windowed). `windows`: the file's own [{name, center, width}]; `default`: the window
    the indexer rendered with (None: the VOI LUT Sequence of `voi_ds`)."""

    values: np.ndarray
    windows: list[dict[str, Any]] = field(default_factory=list)
    default: tuple[float, float] | None = None
    monochrome1: bool = False
    voi_ds: Any = None          # the header (no pixel data) when a VOI LUT Sequence is the default

    @property
    def grey(self) -> bool:
        return self.values.ndim == 2

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)

    def describe(self) -> dict[str, Any]:
        """What the page needs to draw its controls: size, whether it can be windowed, the windows, the range."""
        height, width = self.values.shape[:2]
        out: dict[str, Any] = {"width": width, "height": height, "grey": self.grey, "windows": self.windows}
        if self.grey:
            low, high = float(np.nanmin(self.values)), float(np.nanmax(self.values))
            out["range"] = [low, high]
            center, width_ = self.default or (low + (high - low) / 2, max(high - low, 1.0))
            out["default"] = {"center": center, "width": width_, "voi_lut": self.default is None}
        return out


class PixelCache:
    """The LRU of decoded images, by (id, content hash): ids are never reused, and new content is a new key."""

    def __init__(self, limit_bytes: int = CACHE_BYTES) -> None:
        self.limit = limit_bytes
        self._items: OrderedDict[tuple[int, str], Pixels] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, fields: dict[str, Any]) -> Pixels:
        key = (int(fields["id"]), str(fields.get("content_hash")))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        found = decode_pixels(fields)  # outside the lock: another image may render meanwhile
        with self._lock:
            self._items[key] = found
            while len(self._items) > 1 and sum(p.nbytes for p in self._items.values()) > self.limit:
                self._items.popitem(last=False)
        return found


def render_png(pixels: Pixels, center: float | None = None, width: float | None = None,
               size: int | None = None) -> bytes:
    """A PNG of the image at window `center`/`width` (the linear VOI function of PS3.3 C.11.2.1.2.1; None: the
    default), its longer side at most `size` pixels (None: full resolution)."""
    from PIL import Image

    values = pixels.values
    if size and max(values.shape[:2]) > size:
        values = _smaller(values, size)
    if not pixels.grey:
        out = values
    elif center is None and pixels.default is None and pixels.voi_ds is not None:
        out = _voi_lut(values, pixels.voi_ds)
    else:
        if center is None or width is None:
            low, high = float(np.nanmin(pixels.values)), float(np.nanmax(pixels.values))
            center, width = pixels.default or (low + (high - low) / 2, max(high - low, 1.0))
        out = window(values, center, width)
    if pixels.grey and pixels.monochrome1:
        out = 255 - out
    buffer = io.BytesIO()
    Image.fromarray(out, "RGB" if out.ndim == 3 else "L").save(buffer, "PNG", compress_level=1)  # speed over size
    return buffer.getvalue()


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """float (H, W) -> uint8 through the linear window (center, width >= 1)."""
    width = max(float(width), 1.0)
    low = center - 0.5 - (width - 1) / 2
    scaled = (values - np.float32(low)) * np.float32(255.0 / max(width - 1, 1e-6))
    np.clip(scaled, 0, 255, out=scaled)
    np.nan_to_num(scaled, copy=False)
    return (scaled + 0.5).astype(np.uint8)


def _smaller(values: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    height, width = values.shape[:2]
    scale = size / max(height, width)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if values.ndim == 2:
        return np.asarray(Image.fromarray(values.astype(np.float32, copy=False), "F").resize(target, Image.BILINEAR))
    return np.asarray(Image.fromarray(values, "RGB").resize(target, Image.BILINEAR))


def _voi_lut(values: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_voi_lut

    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    indexed = values.astype(np.int64) if np.array_equal(values, np.round(values)) else values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        voi = apply_voi_lut(indexed, ds, index=0, prefer_lut=True).astype(np.float32)
    low, high = float(lut.min()), float(lut.max())
    return window(voi, low + (high - low) / 2 + 0.5, max(high - low + 1, 1.0))


# ---------------------------------------------------------------- decoding

def decode_pixels(fields: dict[str, Any]) -> Pixels:
    """An indexed image's Pixels, from its file (or the PACS it was indexed from); QueryError when it cannot be
    read. DICOM is read with the indexer's guards (deflate bombs, oversized frames, --max-megapixels)."""
    from indexer.decode import DecodeError, decode_bytes, sniff_kind

    from ..errors import QueryError

    image_id, path = fields["id"], str(fields["path"])
    try:
        data, kind = _file_bytes(path)
        kind = kind or sniff_kind(Path(path), data[:132])
        if kind == "dicom":
            return _dicom_pixels(data, int(fields.get("frame") or 0))
        decoded = decode_bytes(data, Path(path), frames="all" if fields.get("frame") else "middle")
        picture = dict(decoded.frames).get(fields.get("frame") or 0) or decoded.frames[0][1]
        values = np.asarray(picture)
        return Pixels(values.astype(np.float32) if values.ndim == 2 else values, default=(128.0, 256.0))  # 0..255 as is
    except (DecodeError, OSError) as error:
        raise QueryError(f"cannot render image {image_id}: {error}") from None
    except Exception as error:  # the MIError of a PACS, or a codec's own
        from indexer.errors import one_line
        raise QueryError(f"cannot render image {image_id}: {one_line(error, 160)}") from None


def _file_bytes(path: str) -> tuple[bytes, str | None]:
    from indexer.pacs_keys import is_dicomweb_url, is_dimse_url

    if is_dicomweb_url(path):
        from indexer.sources.dicomweb import read_instance
        return read_instance(path), "dicom"
    if is_dimse_url(path):
        from indexer.sources.dimse import read_instance
        return read_instance(path), "dicom"
    return Path(path).read_bytes(), None


def _dicom_pixels(data: bytes, frame: int) -> Pixels:
    import pydicom
    from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array

    from indexer.decode.bounds import RefusedInput, check_frames, inflate_deflated_dicom
    from indexer.decode import DecodeError, transfer_syntax

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(inflate_deflated_dicom(data, MAX_MEGAPIXELS)), force=True)
            if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
                raise DecodeError("DICOM without pixel data")
            syntax = transfer_syntax(ds)
            if syntax.is_compressed and not get_decoder(syntax).is_available:
                raise DecodeError(f"unsupported transfer syntax: {syntax.name}")
            n_frames = int(ds.get("NumberOfFrames") or 1)
            frame = min(max(frame, 0), n_frames - 1)
            if int(ds.Rows) * int(ds.Columns) / 1e6 > MAX_MEGAPIXELS:
                raise DecodeError(f"too big: over {MAX_MEGAPIXELS:g} megapixels")
            check_frames(ds, str(syntax), [frame], n_frames, MAX_MEGAPIXELS)
            arr = pixel_array(ds, index=frame if n_frames > 1 else None)
            if arr.ndim == 3 and arr.shape[-1] != 3 and n_frames == 1:
                arr = arr[0]
            photometric = ds.get("PhotometricInterpretation")
            if arr.ndim == 3 or photometric == "PALETTE COLOR":
                from indexer.decode import colour_to_8bit
                return Pixels(np.asarray(colour_to_8bit(arr, ds).convert("RGB")))
            values = apply_modality_lut(arr, ds).astype(np.float32)
    except RefusedInput as error:
        raise DecodeError(str(error)) from None
    windows = _windows(ds)
    voi_lut = "VOILUTSequence" in ds
    default = None if voi_lut else (windows[0]["center"], windows[0]["width"]) if windows else None
    if default is None and not voi_lut:
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        default = (low + (high - low) / 2 + 0.5, high - low + 1)  # the full range, as the indexer renders it
    header = None
    if voi_lut:
        del ds.PixelData
        header = ds
    return Pixels(values, windows, default, photometric == "MONOCHROME1", header)


def _windows(ds: Any) -> list[dict[str, Any]]:
    """The file's own WindowCenter/WindowWidth pairs, with their explanations where it has them."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return []
    centers, widths = _list(ds.WindowCenter), _list(ds.WindowWidth)
    names = _list(ds.get("WindowCenterWidthExplanation") or [])
    out = []
    for number, (center, width) in enumerate(zip(centers, widths)):
        try:
            center, width = float(center), float(width)
        except (TypeError, ValueError):
            continue
        if width >= 1:
            name = str(names[number]) if number < len(names) and str(names[number]).strip() else f"DICOM {number + 1}"
            out.append({"name": name, "center": center, "width": width})
    return out


def _list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]
