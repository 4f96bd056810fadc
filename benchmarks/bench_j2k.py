"""JPEG 2000 DICOM: exact decoding against `--fast-j2k` (a reduced resolution level), on real
files from pydicom-data (CR and MR, lossless and lossy): decode time, the 8-bit input's
difference, and the embedding's cosine to the exact path.

    python benchmarks/bench_j2k.py [MODEL_FOLDER]     # default: the tiny test fixture
    python benchmarks/bench_j2k.py /tmp/mi-full       # full-size random weights (bench_encode.py --random-full)

Prints measured numbers; asserts nothing. The target for making it the default: cosine >= 0.999.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from encoders import load_model  # noqa: E402
from indexer.decode import decode_file  # noqa: E402

NAMES = ["RG1_J2KR.dcm", "RG3_J2KR.dcm", "MR2_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KI.dcm", "MR2_J2KI.dcm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(REPO / "tests" / "fixtures" / "medimageinsight-tiny"))
    args = parser.parse_args()
    import data_store

    folder = Path(data_store.__file__).parent / "data"
    model = load_model(args.model, device="cpu", towers=("image",))
    target = min(model.preprocess.size)
    print(f"model {args.model}; load average {os.getloadavg()[0]:.1f}")
    for name in NAMES:
        start = time.perf_counter()
        exact = decode_file(folder / name).frames[0][1]
        exact_s = time.perf_counter() - start
        start = time.perf_counter()
        fast = decode_file(folder / name, j2k_reduce_to=target).frames[0][1]
        fast_s = time.perf_counter() - start
        a, b = model.encode_images([exact, fast])
        cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        diff = np.abs(model.preprocess.resize(exact).astype(np.float32) - model.preprocess.resize(fast))
        print(f"{name}: {exact.size} -> {fast.size}; decode {exact_s * 1000:.0f} ms exact, {fast_s * 1000:.0f} ms "
              f"reduced ({exact_s / fast_s:.1f}x); input mean abs diff {diff.mean():.2f}/255; cosine {cosine:.5f}")


if __name__ == "__main__":
    main()
