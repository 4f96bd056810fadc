"""Small synthetic images for tests that need real files to index."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, count: int, seed: int = 0, size: int = 64) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        paths.append(folder / f"img{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(paths[-1])
    return paths


def planted_cr(path: Path, patient_id: str, *, study: str | None = None, seed: int = 0,
               name: str = "Planted^Patient", body_part: str | None = None) -> Path:
    """A small 12-bit CR written with pydicom, its own study unless given, carrying a planted PatientName,
    PatientID and birth date (what must never reach the index or any output)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, patient_id, "19491231"
    ds.Modality = "CR"
    if body_part:
        ds.BodyPartExamined = body_part
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (64, 64), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
