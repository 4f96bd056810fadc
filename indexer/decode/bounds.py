"""Limits on what a file may make the decoder do before any pixel is decoded: how far a deflated
DICOM dataset may inflate, and what size a compressed frame's own codestream may declare.

A small file can claim a huge decode in two ways. A Deflated Explicit VR Little Endian dataset
inflates without bound (pydicom inflates it whole, in one call, before reading an element): it
is inflated here in steps and refused past `max_inflated_bytes`. A JPEG, JPEG-LS or JPEG 2000
frame carries its own size (SOFn, SOF55, SIZ), which the codec decodes whatever Rows/Columns
say: it is read here and refused when it differs from Rows/Columns or exceeds the megapixel
limit, so the codec never sees it.
"""
from __future__ import annotations

import io
import struct
import zlib

DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
_EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"
_INFLATE_STEP = 1 << 20
_FEED_STEP = 1 << 16
# Room for a dataset's elements besides its pixels (overlays, private blocks, sequences).
_ELEMENTS_ALLOWANCE = 64 << 20
# Bytes per allowed pixel: the largest frame --max-megapixels lets through, at 32-bit samples
# (or 8-bit RGB). Deflated multi-frame files past that are refused with the reason.
_BYTES_PER_PIXEL = 4

JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                           "1.2.840.10008.1.2.4.70"})
JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                          "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                          "1.2.840.10008.1.2.4.203"})
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
# SOFn markers (ITU T.81 B.1.1.3) and JPEG-LS's SOF55 (T.87); C4 (DHT), C8 (JPG), CC (DAC) are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: no length


class RefusedInput(Exception):
    """A file refused before decoding, for claiming more work than the limits allow; the message
    is the one-line reason."""


def max_inflated_bytes(max_megapixels: float) -> int:
    """How large a deflated dataset may inflate: the largest frame the megapixel limit allows,
    plus room for the other elements."""
    return _ELEMENTS_ALLOWANCE + int(max_megapixels * 1e6 * _BYTES_PER_PIXEL)


def bounded_inflate(zipped: bytes, limit: int) -> bytes:
    """Raw DEFLATE data inflated, at most `limit` bytes of it: RefusedInput past that, after
    inflating no more than `limit` + one step."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    chunks: list[bytes] = []
    size = 0
    view = memoryview(zipped)
    try:
        for start in range(0, len(zipped), _FEED_STEP):
            pending: bytes | memoryview = view[start:start + _FEED_STEP]
            while pending and not inflater.eof:
                chunk = inflater.decompress(pending, _INFLATE_STEP)
                size += len(chunk)
                if size > limit:
                    raise RefusedInput(f"decompression bomb: the deflated dataset inflates past {limit >> 20} MiB")
                chunks.append(chunk)
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        chunks.append(inflater.flush())
    except zlib.error as e:
        raise RefusedInput(f"corrupt deflated DICOM dataset: {e}") from None
    return b"".join(chunks)


def inflate_deflated_dicom(data: bytes, max_megapixels: float) -> bytes:
    """The same file with its deflated dataset inflated (within `max_inflated_bytes`) and its
    transfer syntax set to Explicit VR Little Endian, for pydicom to read without inflating
    anything itself; any other file unchanged."""
    if DEFLATED_SYNTAX.encode() not in data[:4096]:  # the syntax is in the file meta, at the start
        return data
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info

    source = DicomBytesIO(data)
    try:
        preamble = read_preamble(source, force=True)
        meta = _read_file_meta_info(source)
    except Exception:  # an unreadable file meta: pydicom says why when it reads the file
        return data
    if meta.get("TransferSyntaxUID") != DEFLATED_SYNTAX:
        return data
    inflated = bounded_inflate(data[source.tell():], max_inflated_bytes(max_megapixels))
    meta.TransferSyntaxUID = _EXPLICIT_LITTLE
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength
    target = DicomBytesIO()
    if preamble is not None:
        target.write(preamble + b"DICM")
    write_file_meta_info(target, meta, enforce_standard=False)
    target.write(inflated)
    return target.getvalue()


def codestream_size(codestream: bytes, syntax: str) -> tuple[int, int] | None:
    """(columns, rows) a compressed frame declares, from its JPEG 2000 SIZ or JPEG/JPEG-LS SOF
    marker; None for a syntax without one here (RLE, uncompressed). RefusedInput when a JPEG
    family codestream has no readable size: its codec could not decode it either."""
    if syntax in J2K_SYNTAXES:
        return _j2k_size(codestream)
    if syntax in JPEG_SYNTAXES or syntax in JPEG_LS_SYNTAXES:
        return _jpeg_size(codestream)
    return None


def _j2k_size(codestream: bytes) -> tuple[int, int]:
    # ISO 15444-1 A.5.1: SOC, SIZ, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz (a JP2 file wraps the same
    # codestream in boxes: its SOC+SIZ is searched for).
    start = codestream.find(_J2K_SOC_SIZ, 0, 1 << 16)
    if start < 0 or len(codestream) < start + 24:
        raise RefusedInput("corrupt JPEG 2000 frame: no SIZ marker")
    xsiz, ysiz, x0, y0 = struct.unpack_from(">4I", codestream, start + 8)
    return max(0, xsiz - x0), max(0, ysiz - y0)


def _jpeg_size(codestream: bytes) -> tuple[int, int]:
    # The segments after SOI up to the first frame header: each FFxx marker, a 2-byte length.
    position = codestream.find(b"\xff\xd8", 0, 1 << 10)
    if position < 0:
        raise RefusedInput("corrupt JPEG frame: no SOI marker")
    position += 2
    end = len(codestream)
    while position + 4 <= end:
        if codestream[position] != 0xFF:
            position += 1               # fill bytes or garbage between segments
            continue
        marker = codestream[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        if marker in _SOF_MARKERS:
            if position + 9 > end:
                break
            rows, columns = struct.unpack_from(">HH", codestream, position + 5)
            return columns, rows
        if marker == 0xDA:              # scan data before any frame header
            break
        (length,) = struct.unpack_from(">H", codestream, position + 2)
        position += 2 + length
    raise RefusedInput("corrupt JPEG frame: no frame header (SOF marker)")


def check_codestream(codestream: bytes, syntax: str, rows: int, columns: int, max_megapixels: float) -> None:
    """RefusedInput when a frame's codestream declares another size than Rows x Columns, or more
    than the megapixel limit: checked before the codec allocates anything for it."""
    size = codestream_size(codestream, syntax)
    if size is None:
        return
    width, height = size
    if height == 0 and syntax in JPEG_SYNTAXES:  # T.81 B.2.2: the height comes later, in a DNL segment
        height = rows
    megapixels = width * height / 1e6
    if megapixels > max_megapixels:
        raise RefusedInput(f"too big: the frame's codestream is {width}x{height} ({megapixels:.0f} megapixels) "
                           f"> --max-megapixels {max_megapixels:g}")
    if (width, height) != (columns, rows):
        raise RefusedInput(f"corrupt DICOM: the frame's codestream is {width}x{height}, "
                           f"Rows/Columns say {columns}x{rows}")


def check_frames(ds, syntax: str, indices: list[int], n_frames: int, max_megapixels: float) -> None:
    """`check_codestream` on each frame of an encapsulated dataset that will be decoded."""
    if syntax not in J2K_SYNTAXES and syntax not in JPEG_SYNTAXES and syntax not in JPEG_LS_SYNTAXES:
        return
    from pydicom.encaps import get_frame

    rows, columns = int(ds.Rows), int(ds.Columns)
    for index in indices:
        try:
            codestream = get_frame(ds.PixelData, index, number_of_frames=n_frames)
        except Exception:  # a broken encapsulation: the decoder reports it as it does today
            return
        check_codestream(codestream, syntax, rows, columns, max_megapixels)
