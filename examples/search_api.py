"""Index a small folder, then search it by text and by example image through the Python API.

    python examples/search_api.py                    # offline: tiny test model, sample images
    python examples/search_api.py FOLDER             # your own folder of X-rays / DICOM files
    MI_MODEL=/path/to/2024.09.27 python examples/search_api.py FOLDER   # the real weights

Without MI_MODEL this uses the tiny random-weight model in tests/fixtures/medimageinsight-tiny,
so it runs offline in seconds, but its rankings mean nothing; with the real MedImageInsight
weights the same code gives real results. Without FOLDER it indexes a few real DICOM files
from pydicom's test data plus some generated PNGs, in a temporary folder.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import indexer  # noqa: E402
from retrieval import Searcher  # noqa: E402

TINY_MODEL = ROOT / "tests" / "fixtures" / "medimageinsight-tiny"


def sample_folder(folder: Path) -> Path:
    """A few images to index: real DICOM files shipped with pydicom, and generated PNGs."""
    import numpy as np
    import pydicom
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    test_files = Path(pydicom.__file__).parent / "data" / "test_files"  # globbed: no downloads
    for name in ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "examples_rgb_color.dcm"]:
        if (test_files / name).is_file():
            shutil.copy(test_files / name, folder / name)
    y, x = np.mgrid[0:256, 0:256]
    Image.fromarray((x % 256).astype(np.uint8)).save(folder / "gradient.png")
    Image.fromarray((((x // 32) + (y // 32)) % 2 * 255).astype(np.uint8)).save(folder / "checkerboard.png")
    disc = ((x - 128) ** 2 + (y - 128) ** 2 < 80 ** 2) * 255
    Image.fromarray(disc.astype(np.uint8)).save(folder / "disc.png")
    return folder


def main() -> None:
    model = os.environ.get("MI_MODEL") or str(TINY_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(sys.argv[1]) if len(sys.argv) > 1 else sample_folder(Path(tmp) / "images")
        index_dir = Path(tmp) / "index"

        summary = indexer.index_paths([folder], index_dir, model=model)
        print(f"indexed {folder}: {summary['new']} new, {summary['updated']} updated, "
              f"{summary['unchanged']} unchanged, {summary['skipped']} skipped")

        with Searcher(index=index_dir, model=model) as searcher:
            print('\ntext query "chest x-ray", top 3:')
            for hit in searcher.search("chest x-ray", k=3):
                print(f"  {hit.rank}. {hit.score:.3f}  {hit.path}  {hit.metadata.get('modality') or ''}")

            example = searcher.search("chest x-ray", k=1)[0].path
            print(f"\nimage query {example}, top 3 (the image itself comes first):")
            for hit in searcher.search(image=example, k=3):
                print(f"  {hit.rank}. {hit.score:.3f}  {hit.path}")

            print(f"\nzero-shot labels for {example}:")
            print(" ", searcher.classify(example, ["normal chest x-ray", "pneumothorax", "ct scan"]))


if __name__ == "__main__":
    main()
