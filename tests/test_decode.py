"""Decoding real files no one here wrote: pydicom's test files and pydicom-data's."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from indexer.decode import DecodeError, decode_bytes, decode_file, sniff_kind
from indexer.errors import REASON_LIMIT

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
data_store = pytest.importorskip("data_store")
DATA_STORE = Path(data_store.__file__).parent / "data"


def find(name: str) -> Path:
    for folder in (PYDICOM_FILES, DATA_STORE):
        if (folder / name).exists():
            return folder / name
    pytest.skip(f"{name} is not shipped here")


def pixels(path: Path, **kwargs) -> np.ndarray:
    return np.asarray(decode_file(path, **kwargs).frames[0][1])


def test_every_test_file_decodes_or_gives_a_reason():
    files = [p for p in sorted(PYDICOM_FILES.rglob("*")) + sorted(DATA_STORE.glob("*")) if p.is_file()]
    decoded, reasons = 0, {}
    for path in files:
        try:
            result = decode_file(path)
        except DecodeError as e:
            reasons[path.name] = str(e)
            # one line, whole up to the limit (a reason cut mid-word says less than it knew)
            assert str(e) and "\n" not in str(e) and len(str(e)) <= REASON_LIMIT + 40
            continue
        decoded += 1
        for _, image in result.frames:
            assert image.mode in ("L", "RGB") and image.width > 0 and image.height > 0
    assert len(files) > 200 and decoded > 150
    assert reasons["MR_truncated.dcm"].startswith("truncated or corrupt DICOM")
    assert "badVR.dcm" in reasons and "JPEG-lossy.dcm" in reasons and "meta_missing_tsyntax.dcm" in reasons
    assert reasons["README.txt"] == "not an image or DICOM file"
    assert reasons["rtplan.dcm"] == "DICOM without pixel data"


def test_real_chest_cr_monochrome1_is_inverted_and_windowed():
    image = pixels(DATA_STORE / "RG1_UNCR.dcm")
    ds = pydicom.dcmread(DATA_STORE / "RG1_UNCR.dcm", stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BodyPartExamined == "CHEST"
    h, w = image.shape
    mediastinum = image[h // 4: 3 * h // 4, 2 * w // 5: 3 * w // 5].mean()
    lungs = (image[h // 4: 3 * h // 4, w // 8: 3 * w // 10].mean() + image[h // 4: 3 * h // 4, 7 * w // 10: 7 * w // 8].mean()) / 2
    assert mediastinum > lungs + 20  # displayed as radiologists see it: lungs dark, mediastinum bright
    assert image.std() > 20  # the window spreads the image over the 8-bit range


def test_jpeg2000_lossless_equals_uncompressed_and_lossy_is_close():
    uncompressed = pixels(DATA_STORE / "RG1_UNCR.dcm")
    np.testing.assert_array_equal(pixels(DATA_STORE / "RG1_J2KR.dcm"), uncompressed)
    lossy = pixels(DATA_STORE / "RG1_J2KI.dcm")
    assert lossy.shape == uncompressed.shape and np.abs(lossy.astype(int) - uncompressed).mean() < 2


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPEG2000.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
                                  "SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPEGLSNearLossless_16.dcm"])
def test_compressed_transfer_syntaxes(name):
    image = decode_file(find(name)).frames[0][1]
    assert np.asarray(image).std() > 1  # real content, not a blank frame


def test_colour_ybr_and_palette_become_rgb():
    rgb = decode_file(find("SC_rgb.dcm")).frames[0][1]
    ybr = decode_file(find("SC_ybr_full_uncompressed.dcm")).frames[0][1]
    assert rgb.mode == ybr.mode == "RGB"
    difference = np.abs(np.asarray(rgb).astype(int) - np.asarray(ybr))
    assert difference.max() <= 8 and difference.mean() < 1  # the same picture (unconverted YBR is ~100 off)
    palette = decode_file(find("examples_palette.dcm")).frames[0][1]
    assert palette.mode == "RGB" and np.asarray(palette).std() > 1


def test_multiframe_middle_or_all():
    path = find("emri_small.dcm")
    n_frames = int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames)
    middle = decode_file(path)
    assert [index for index, _ in middle.frames] == [n_frames // 2]
    every = decode_file(path, frames="all")
    assert [index for index, _ in every.frames] == list(range(n_frames))


def test_metadata_keeps_no_direct_identifiers():
    decoded = decode_file(PYDICOM_FILES / "CT_small.dcm", patient_key=b"one")
    meta = decoded.metadata
    assert meta["modality"] == "CT" and meta["study_date"] == "2004-01-19"
    assert not any("name" in key or "birth" in key for key in meta)
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm", stop_before_pixels=True)
    assert str(ds.PatientID) not in map(str, meta.values()) and str(ds.PatientName) not in map(str, meta.values())
    assert meta["patient_hash"] and meta["patient_hash"] != decode_file(PYDICOM_FILES / "CT_small.dcm",
                                                                       patient_key=b"two").metadata["patient_hash"]
    assert decode_file(PYDICOM_FILES / "CT_small.dcm").metadata["patient_hash"] is None  # no key: no pseudonym


def test_dicom_without_extension_is_found_by_preamble(tmp_path):
    target = tmp_path / "IM000001"
    target.write_bytes((PYDICOM_FILES / "CT_small.dcm").read_bytes())
    assert sniff_kind(target) == "dicom"
    assert decode_file(target).source_format == "dicom"
    (tmp_path / "notes").write_text("hello")
    assert sniff_kind(tmp_path / "notes") is None


def test_bad_plain_images(tmp_path):
    with pytest.raises(DecodeError, match="empty file"):
        decode_bytes(b"", Path("x.png"))
    with pytest.raises(DecodeError, match="not an image"):
        decode_bytes(b"this is text", Path("x.png"))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)).save(buffer, "PNG")
    with pytest.raises(DecodeError, match="truncated or corrupt"):
        decode_bytes(buffer.getvalue()[:2000], Path("x.png"))
    with pytest.raises(DecodeError, match="too big"):
        decode_bytes(buffer.getvalue(), Path("x.png"), max_megapixels=0.05)


def test_16_bit_png_uses_its_range(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 4 + 1000)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    image = pixels(path)
    assert image.min() == 0 and image.max() == 255 and np.all(np.diff(image.ravel().astype(int)) >= 0)


def test_unsupported_transfer_syntax_is_a_reason():
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.PixelData = encapsulate([b"\x00" * 100])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # video: no decoder installed for it
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(DecodeError, match="unsupported transfer syntax: MPEG2"):
        decode_bytes(buffer.getvalue(), Path("video.dcm"))


def test_reduction_levels_keep_the_shorter_side_at_least_the_target():
    from indexer.decode import reduction_level
    assert [reduction_level(n, n + 100, 480) for n in (479, 959, 960, 1841, 1920, 3840)] == [0, 0, 1, 1, 2, 3]


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG3_J2KR.dcm", "MR2_J2KR.dcm", "RG1_J2KI.dcm"])
def test_fast_j2k_decodes_a_reduced_level_close_to_the_exact_image(name):
    """Real JPEG 2000 CR and MR files (pydicom-data): half the size, stored values scaled back
    (Pillow widens 15-, 12- and 10-bit samples to 16 bits), so windowing gives the same picture."""
    from encoders.preprocess import ImagePreprocessor

    exact = decode_file(DATA_STORE / name).frames[0][1]
    fast = decode_file(DATA_STORE / name, j2k_reduce_to=480).frames[0][1]
    assert fast.size == ((exact.width + 1) // 2, (exact.height + 1) // 2)
    resize = ImagePreprocessor((480, 480), (0.5,) * 3, (0.5,) * 3).resize
    difference = np.abs(resize(exact).astype(np.float32) - resize(fast).astype(np.float32))
    assert difference.mean() < 3.0 and np.percentile(difference, 99) < 24  # of 255 (MR texture: 17)


def test_fast_j2k_leaves_small_and_other_images_exact():
    small = DATA_STORE / "US1_J2KR.dcm"  # 480 x 640: under twice the target
    uncompressed = DATA_STORE / "RG3_UNCR.dcm"
    for path in (small, uncompressed):
        exact, fast = decode_file(path).frames[0][1], decode_file(path, j2k_reduce_to=480).frames[0][1]
        assert fast.size == exact.size and np.array_equal(np.asarray(fast), np.asarray(exact))
