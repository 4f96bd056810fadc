"""`mi-index --sample`: a dozen real DICOM images to try the tool on before pointing it at an
archive. They come from test-data packages (pydicom's own files, always installed, and
pydicom-data's when the `sample` extra is installed: a real PA chest CR, an extremity CR, CT,
MR and ultrasound), copied into the per-user data folder so the index points at files that
stay put. No patient data: these are the libraries' public, anonymised test images."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PYDICOM_FILES = ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "MR_small.dcm", "examples_overlay.dcm",
                 "examples_rgb_color.dcm", "examples_jpeg2k.dcm")
PYDICOM_DATA_FILES = ("RG1_J2KI.dcm", "RG3_J2KI.dcm", "MR2_J2KI.dcm", "693_J2KR.dcm", "US1_J2KI.dcm",
                      "MR-SIEMENS-DICOM-WithOverlays.dcm", "emri_small.dcm")


def sample_sources() -> list[Path]:
    """The sample's files where their packages installed them (globbed: pydicom's
    get_testdata_file would try to download)."""
    import pydicom

    found = [Path(pydicom.__file__).parent / "data" / "test_files" / name for name in PYDICOM_FILES]
    try:
        import data_store  # pydicom-data
        folder = Path(data_store.__file__).parent / "data"
        found += [folder / name for name in PYDICOM_DATA_FILES]
    except ImportError:
        pass
    return [path for path in found if path.is_file()]


def sample_folder(target: Path | None = None) -> Path:
    """The sample copied into `target` (default: `sample/` in the per-user data folder); files
    already there are left as they are."""
    target = target or default_target()
    _copy_into(target, copied=[])
    return target


@contextmanager
def sample_copy(target: Path | None = None) -> Iterator[Path]:
    """`sample_folder` for the length of a block that indexes it: when the block fails (an error, ^C), what
    this call copied and the folders it made are removed again, so that a failed first run leaves no copy."""
    target = target or default_target()
    made = [folder for folder in (target, *target.parents) if not folder.exists()]  # deepest first
    copied: list[Path] = []
    try:
        _copy_into(target, copied)
        yield target
    except BaseException:
        for copy in copied:
            copy.unlink(missing_ok=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # something else was put there meanwhile: left as it is
                break
        raise


def default_target() -> Path:
    import platformdirs
    return Path(platformdirs.user_data_dir("medimageinsight-search")) / "sample"


def _copy_into(target: Path, copied: list[Path]) -> None:
    """Copy the sample's files that `target` lacks (or holds at another size), each appended to `copied`
    before it is written."""
    target.mkdir(parents=True, exist_ok=True)
    for source in sample_sources():
        copy = target / source.name
        if not copy.exists() or copy.stat().st_size != source.stat().st_size:
            copied.append(copy)
            shutil.copyfile(source, copy)
