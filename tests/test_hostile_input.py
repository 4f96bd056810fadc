"""Hostile DICOM files refused before they cost memory or time (decompression bombs: a deflated
dataset of zeros, codestreams larger than the image they claim), and malformed headers whose
values run over the patient's name, ID and birth date, which must never reach the index."""
from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

import indexer
from encoders import load_model
from indexer.decode.bounds import max_inflated_bytes
from indexer.decode import DecodeError, decode_bytes

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
MiB = 1 << 20


def _dataset(rows: int, columns: int, syntax: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    return ds


def _written(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def deflate_bomb(zeros: int) -> bytes:
    """A Deflated Explicit VR Little Endian file: an 8x8 image, then `zeros` zero bytes in a
    private element; a few hundred KB on disk."""
    ds = _dataset(8, 8, "1.2.840.10008.1.2.1.99")
    ds.PixelData = bytes(range(64))
    raw = _written(ds)
    meta_end = 132 + 12 + struct.unpack_from("<I", raw, 140)[0]   # after (0002,0000)'s group
    dataset = zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [raw[:meta_end], packer.compress(dataset),
             packer.compress(struct.pack("<HH2sHI", 0x0009, 0x1001, b"OB", 0, zeros))]
    block = bytes(MiB)
    parts += [packer.compress(block) for _ in range(zeros // MiB)]
    parts.append(packer.flush())
    return b"".join(parts)


def codestream_bomb(kind: str, claimed: int = 64, real: int = 4000) -> bytes:
    """A file claiming `claimed` x `claimed` pixels whose one JPEG 2000 or JPEG frame declares
    `real` x `real` (its size fields rewritten: OpenJPEG and libjpeg decode a truncated
    codestream whole, filling the rest)."""
    image = Image.fromarray(np.full((claimed, claimed), 128, np.uint8))
    out = io.BytesIO()
    if kind == "j2k":
        image.save(out, "JPEG2000", no_jp2=True)
        code = bytearray(out.getvalue())
        struct.pack_into(">4I", code, 8, real, real, 0, 0)   # SIZ: Xsiz, Ysiz, XOsiz, YOsiz
        struct.pack_into(">2I", code, 24, real, real)        # XTsiz, YTsiz: one tile
        syntax = "1.2.840.10008.1.2.4.90"
    else:
        image.save(out, "JPEG", quality=90)
        code = bytearray(out.getvalue())
        struct.pack_into(">HH", code, code.find(b"\xff\xc0") + 5, real, real)   # SOF0: Y, X
        syntax = "1.2.840.10008.1.2.4.50"
    ds = _dataset(claimed, claimed, syntax)
    ds.PixelData = encapsulate([bytes(code)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _written(ds)


def _refused_within(data: bytes, max_megapixels: float, peak_bytes: int) -> str:
    """The reason `data` is refused; asserts Python's allocations stayed under `peak_bytes`."""
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as refused:
            decode_bytes(data, Path("hostile.dcm"), max_megapixels=max_megapixels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < peak_bytes, f"{peak / MiB:.0f} MiB allocated to refuse it"
    return str(refused.value)


def test_a_deflate_bomb_is_refused_within_the_inflation_limit():
    limit = max_inflated_bytes(1.0)                       # 68 MiB at 1 megapixel
    bomb = deflate_bomb(4 * limit)                        # about 4 x 68 MiB of zeros
    assert len(bomb) < 2 * MiB
    reason = _refused_within(bomb, 1.0, limit + 16 * MiB)
    assert "decompression bomb" in reason and "\n" not in reason


def test_a_deflated_file_within_the_limit_still_decodes():
    decoded = decode_bytes(deflate_bomb(MiB), Path("fine.dcm"), max_megapixels=1.0)
    assert np.asarray(decoded.frames[0][1]).shape == (8, 8)
    real = Path(pydicom.__file__).parent / "data" / "test_files" / "image_dfl.dcm"
    assert decode_bytes(real.read_bytes(), real).frames


@pytest.mark.parametrize("kind", ["j2k", "jpeg"])
def test_a_codestream_larger_than_its_image_is_refused_before_decoding(kind):
    bomb = codestream_bomb(kind)
    assert len(bomb) < 4096
    reason = _refused_within(bomb, 100.0, 2 * MiB)        # decoding it takes 16 MB
    assert "codestream is 4000x4000" in reason and "64x64" in reason
    reason = _refused_within(codestream_bomb(kind, real=16000), 100.0, 2 * MiB)
    assert "too big" in reason and "--max-megapixels 100" in reason


@pytest.mark.parametrize("kind", ["j2k", "jpeg"])
def test_a_codestream_of_its_own_size_still_decodes(kind):
    decoded = decode_bytes(codestream_bomb(kind, real=64), Path("fine.dcm"))
    assert np.asarray(decoded.frames[0][1]).shape == (64, 64)


# --- PHI in malformed headers ---------------------------------------------------------------------

PHI = {"name": "Zebulon^Quixotic", "id": "PIDQ7X3Z9", "birth": "19390417", "other_id": "OTHERQ55W",
       "address": "42 Quixote Lane"}


def _overrun(data: bytes, tag: tuple[int, int], vr: bytes, until: tuple[int, int]) -> bytes:
    """`data` with the length of element `tag` (explicit VR, 2-byte length) changed so that its
    value runs over every element up to and including `until`, as a malformed file would."""
    header = struct.pack("<HH", *tag) + vr
    start = data.index(header)
    value_start = start + 8
    end_header = data.index(struct.pack("<HH", *until), value_start)
    (until_length,) = struct.unpack_from("<H", data, end_header + 6)
    length = end_header + 8 + until_length - value_start
    return data[:start + 6] + struct.pack("<H", length) + data[start + 8:]


def phi_files(folder: Path) -> list[Path]:
    """Three real DICOM files whose stored fields overrun into patient data: SeriesDescription
    into PatientName/ID/BirthDate, PatientSex into OtherPatientIDs, PatientAge into
    PatientAddress."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, (tag, vr, until) in enumerate([((0x0008, 0x103E), b"LO", (0x0010, 0x0030)),
                                               ((0x0010, 0x0040), b"CS", (0x0010, 0x1000)),
                                               ((0x0010, 0x1010), b"AS", (0x0010, 0x1040))]):
        ds = _dataset(64, 64, "1.2.840.10008.1.2.1")
        ds.SeriesDescription = "CHEST1"
        ds.PatientName = PHI["name"]
        ds.PatientID = PHI["id"]
        ds.PatientBirthDate = PHI["birth"]
        ds.PatientSex = "F"
        ds.OtherPatientIDs = PHI["other_id"]
        ds.PatientAge = "085Y"
        ds.PatientAddress = PHI["address"]
        ds.PixelData = np.random.default_rng(number).integers(0, 256, (64, 64), dtype=np.uint8).tobytes()
        paths.append(folder / f"phi{number}.dcm")
        paths[-1].write_bytes(_overrun(_written(ds), tag, vr, until))
    return paths


def _secrets_in(text: str) -> list[str]:
    words = [*PHI.values(), "Zebulon", "Quixot", "1939-04-17", "Quixote"]
    return [word for word in words if word.lower() in text.lower()]


def test_values_run_over_patient_data_are_never_stored(tmp_path):
    for path in phi_files(tmp_path):
        data = path.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        # the file really is malformed that way: pydicom reads the patient data as the value
        read = " ".join(str(ds.get(k, "")) for k in ("SeriesDescription", "PatientSex", "PatientAge"))
        assert _secrets_in(read), read
        metadata = decode_bytes(data, path, patient_key=b"k" * 32).metadata
        assert not _secrets_in(json.dumps(metadata)), metadata
        assert metadata["modality"] == "OT"                 # the fields that are sound are kept


def test_a_value_read_as_the_vr_its_file_claims_is_checked_as_its_real_vr(tmp_path):
    ds = _dataset(8, 8, "1.2.840.10008.1.2.1")
    ds.PixelData = bytes(64)
    ds.add_new(0x0008103E, "UT", f"{PHI['name']} {PHI['id']} born {PHI['birth']} " * 3)  # LO claimed UT
    ds.add_new(0x00101010, "LO", PHI["address"])                                         # AS claimed LO
    metadata = decode_bytes(_written(ds), Path("claims.dcm")).metadata
    assert metadata["series_description"] is None and metadata["patient_age"] is None


def test_phi_never_reaches_the_index_the_search_output_the_api_or_the_logs(tmp_path, caplog, capfd):
    import logging

    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from retrieval.cli import main as mi_search
    from retrieval.server import create_app

    caplog.set_level(logging.DEBUG)
    data = tmp_path / "data"
    phi_files(data)
    index = tmp_path / "index"
    model = load_model(FIXTURE, device="cpu")
    indexer.index_paths([data], index, model=model, workers=0)
    result = CliRunner().invoke(mi_search, ["x", "--index", str(index), "--model", str(FIXTURE), "--json", "-k", "5"],
                                env={"MI_MODEL": None, "MI_INDEX": None})
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 3                                   # all three indexed, none lost
    client = TestClient(create_app(index, model=model))
    answers = [client.get("/api/search", params={"q": "x", "k": 5}).text]
    for hit in client.get("/api/search", params={"q": "x", "k": 5}).json():
        answers.append(client.get(f"/api/images/{hit['id']}").text)
        assert client.get(f"/api/images/{hit['id']}/thumbnail").status_code == 200
    stored = b"".join(path.read_bytes() for path in index.rglob("*") if path.is_file())
    captured = capfd.readouterr()
    for where, text in [("the index folder", stored.decode("latin-1")), ("mi-search --json", result.output),
                        ("the API", " ".join(answers)), ("the logs", caplog.text + captured.out + captured.err)]:
        assert not _secrets_in(text), f"{where} holds {_secrets_in(text)}"
