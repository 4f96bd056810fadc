"""bfloat16 against float32 on the CPU: time and embedding cosine for real DICOM images.

    python benchmarks/bench_precision.py [MODEL_FOLDER] [--images 2]

On a CPU without AVX-512 BF16 / AMX, bfloat16 is emulated (much slower); the cosine says what
it costs in accuracy. Prints measured numbers; asserts nothing.
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
from indexer.decode import DecodeError, decode_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(REPO / "tests" / "fixtures" / "medimageinsight-tiny"))
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args()
    import data_store

    pictures = []
    for path in sorted((Path(data_store.__file__).parent / "data").glob("*.dcm")):
        try:
            pictures.append(decode_file(path).frames[0][1])
        except DecodeError:
            continue
        if len(pictures) == args.images:
            break
    print(f"model {args.model}; {len(pictures)} real DICOM images; load average {os.getloadavg()[0]:.1f}")
    vectors = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(args.model, device="cpu", dtype=dtype, towers=("image",))
        start = time.perf_counter()
        vectors[dtype] = model.encode_images(pictures)
        print(f"{dtype}: {time.perf_counter() - start:.1f} s")
        del model
    a, b = vectors["float32"], vectors["bfloat16"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print("cosine to float32 per image: " + ", ".join(f"{c:.5f}" for c in cosine))


if __name__ == "__main__":
    main()
