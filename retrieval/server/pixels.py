"""The viewer's pixels: an indexed image decoded again from its original values (DICOM stored values through the
modality LUT, Hounsfield units for CT), its own windows, and PNGs rendered at any window/level and size.

The decoded arrays are kept in a small in-memory LRU (bounded in bytes; integer values as 16-bit integers, half
the bytes of floats), with the smaller copies a drag asks for, so dragging the window re-renders a 2500x2048
image without decoding or resizing it again: only the window (in cache-sized row blocks) and the PNG (png.py).
The defaults are the indexer's (indexer.decode): a VOI LUT Sequence, else the first WindowCenter/WindowWidth,
else the full range; MONOCHROME1 is inverted."""
from __future__ import annotations

import dataclasses
import io
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .png import encode_png

MAX_MEGAPIXELS = 100.0          # as mi-index's default: larger files were never indexed
CACHE_BYTES = 512 << 20         # decoded arrays kept in memory, all together
MAX_RENDER_SIZE = 8192          # pixels, the longer side of a rendered PNG
WINDOW_ROWS = 64                # rows windowed at a time: their float32 copy stays in the CPU's cache


@dataclass
class Pixels:
    """One image's values for the viewer. `values`: grey (H, W) after the modality LUT (int16, uint16 or uint8
    where every value is a whole number that fits, else float32), or uint8 (H, W, 3) colour (not windowed).
    `windows`: the file's own [{name, center, width}]; `default`: the window the indexer rendered with (None:
    the VOI LUT Sequence of `voi_ds`); `range`: the lowest and highest value (of the full-size image)."""

    values: np.ndarray
    windows: list[dict[str, Any]] = field(default_factory=list)
    default: tuple[float, float] | None = None
    monochrome1: bool = False
    voi_ds: Any = None          # the header (no pixel data) when a VOI LUT Sequence is the default
    range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.range is None and self.values.ndim == 2:
            self.range = (float(np.nanmin(self.values)), float(np.nanmax(self.values)))

    @property
    def grey(self) -> bool:
        return self.values.ndim == 2

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)

    def full_range_window(self) -> tuple[float, float]:
        low, high = self.range or (0.0, 255.0)
        return low + (high - low) / 2, max(high - low, 1.0)

    def describe(self) -> dict[str, Any]:
        """What the page needs to draw its controls: size, whether it can be windowed, the windows, the range."""
        height, width = self.values.shape[:2]
        out: dict[str, Any] = {"width": width, "height": height, "grey": self.grey, "windows": self.windows}
        if self.grey:
            out["range"] = list(self.range)
            center, width_ = self.default or self.full_range_window()
            out["default"] = {"center": center, "width": width_, "voi_lut": self.default is None}
        return out

    def smaller(self, size: int | None) -> Pixels:
        """These pixels with the longer side at most `size` (themselves when they are that small already)."""
        if not size or max(self.values.shape[:2]) <= size:
            return self
        return dataclasses.replace(self, values=_smaller(self.values, size), range=self.range)


class PixelCache:
    """The LRU of decoded images by (id, content hash, size): ids are never reused, new content is a new key,
    and a smaller copy (size) is made from the full-size entry once. Bounded by the bytes of all entries
    (the newest is kept whatever its size); one thread decodes a given image while others asking wait."""

    def __init__(self, limit_bytes: int = CACHE_BYTES) -> None:
        self.limit = limit_bytes
        self._items: OrderedDict[tuple[int, str, int], Pixels] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[tuple[int, str, int], threading.Lock] = {}

    def get(self, fields: dict[str, Any], size: int | None = None) -> Pixels:
        """The image's Pixels, its longer side at most `size` (None: full resolution)."""
        key = (int(fields["id"]), str(fields.get("content_hash")), int(size or 0))
        found = self._cached(key)
        if found is not None:
            return found
        full = self.get(fields) if size else None
        if full is not None and max(full.values.shape[:2]) <= size:
            return full  # small enough already: no second entry of the same array
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # outside the cache's lock: other images render meanwhile
            try:
                found = self._cached(key)
                if found is None:
                    found = full.smaller(size) if full is not None else decode_pixels(fields)
                    self._keep(key, found)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
        return found

    def _cached(self, key: tuple[int, str, int]) -> Pixels | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def _keep(self, key: tuple[int, str, int], pixels: Pixels) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = pixels
            self._bytes += pixels.nbytes
            while len(self._items) > 1 and self._bytes > self.limit:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes


def render_png(pixels: Pixels, center: float | None = None, width: float | None = None,
               size: int | None = None) -> bytes:
    """A PNG of the image at window `center`/`width` (the linear VOI function of PS3.3 C.11.2.1.2.1; None: the
    default), its longer side at most `size` pixels (None: full resolution)."""
    values = pixels.smaller(size).values
    if not pixels.grey:
        out = values
    elif center is None and pixels.default is None and pixels.voi_ds is not None:
        out = _voi_lut(values, pixels.voi_ds)
    else:
        if center is None or width is None:
            center, width = pixels.default or pixels.full_range_window()
        out = window(values, center, width)
    if pixels.grey and pixels.monochrome1:
        np.subtract(255, out, out=out)
    return encode_png(out)


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """grey (H, W) -> uint8 through the linear window (center, width >= 1), computed in float32 a block of rows
    at a time (a whole-image float copy costs more in memory traffic than the arithmetic)."""
    width = max(float(width), 1.0)
    low = np.float32(center - 0.5 - (width - 1) / 2)
    scale = np.float32(255.0 / max(width - 1, 1e-6))
    out = np.empty(values.shape, np.uint8)
    block = np.empty((min(WINDOW_ROWS, len(values)),) + values.shape[1:], np.float32)
    has_nan = values.dtype.kind == "f"
    for start in range(0, len(values), WINDOW_ROWS):
        rows = block[:len(values[start:start + WINDOW_ROWS])]
        np.subtract(values[start:start + WINDOW_ROWS], low, out=rows, dtype=np.float32)
        rows *= scale
        np.clip(rows, 0, 255, out=rows)
        if has_nan:
            np.nan_to_num(rows, copy=False)
        rows += np.float32(0.5)
        np.copyto(out[start:start + WINDOW_ROWS], rows, casting="unsafe")
    return out


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
    whole = values.dtype.kind in "iu" or np.array_equal(values, np.round(values))
    indexed = values.astype(np.int64) if whole else values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        voi = apply_voi_lut(indexed, ds, index=0, prefer_lut=True).astype(np.float32)
    low, high = float(lut.min()), float(lut.max())
    return window(voi, low + (high - low) / 2 + 0.5, max(high - low + 1, 1.0))


def compact(values: np.ndarray) -> np.ndarray:
    """Grey values as the smallest exact array: int16, uint16 (or uint8) when all are whole numbers that fit,
    else float32 (the modality LUT's float64 of a CT is whole Hounsfield units: half the bytes of float32)."""
    if values.dtype.kind in "iu" or (np.isfinite(values).all() and np.array_equal(values, np.round(values))):
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        for kind in (np.uint8, np.int16, np.uint16):
            limits = np.iinfo(kind)
            if limits.min <= low and high <= limits.max:
                return values.astype(kind, copy=False)
    return values.astype(np.float32, copy=False)


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
        return Pixels(compact(values) if values.ndim == 2 else values, default=(128.0, 256.0))  # 0..255 as is
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
            values = compact(apply_modality_lut(arr, ds))
    except RefusedInput as error:
        raise DecodeError(str(error)) from None
    windows = _windows(ds)
    voi_lut = "VOILUTSequence" in ds
    default = None if voi_lut else (windows[0]["center"], windows[0]["width"]) if windows else None
    value_range = (float(np.nanmin(values)), float(np.nanmax(values)))
    if default is None and not voi_lut:
        low, high = value_range
        default = (low + (high - low) / 2 + 0.5, high - low + 1)  # the full range, as the indexer renders it
    header = None
    if voi_lut:
        del ds.PixelData
        header = ds
    return Pixels(values, windows, default, photometric == "MONOCHROME1", header, value_range)


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
