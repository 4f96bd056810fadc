#!/usr/bin/env bash
# Issue 8's GPU checks in one call of a lent device machine (H100/H200, 16 cores; it has torch,
# triton, numpy, pillow, pytest, but not this project's other packages, and no network).
#
#   bash benchmarks/gpu_checks.sh --fetch-wheels    # here, once: those packages into .whl/ (~32 MB)
#   then, with the device tool:  run  command="bash benchmarks/gpu_checks.sh"  carry=[".whl"]  timeout_s=540
#
# It runs the CUDA-only tests, the encoder eager vs compiled (images/s, share of bf16 peak, cosine),
# the pipeline's own ceiling on that machine's cores, a simulated device, and mi-index end to end
# on issue 8's mix against compiled encode-only. Every line goes to $OUT/gpu.log as it is printed.
# MODEL (default: random full-size weights built in /tmp/mi-full), ARCHIVE (files, default 1280)
# DEVICE (default cuda), PIPELINE_IMAGES (default 4000) and PYTHON can be set to try the script on a CPU with the tiny model first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
    platforms="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
               --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    for name in faiss-cpu sqlalchemy greenlet pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle \
                ftfy wcwidth platformdirs; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: $platforms -d .whl "$name" || exit 1
    done
    du -sh .whl
    exit 0
fi

OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
DEVICE=${DEVICE:-cuda}
ARCHIVE=${ARCHIVE:-1280}  # 20 batches of 64: no odd last batch to compile again
WORKERS=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
            torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
if [ -z "${MODEL:-}" ]; then
    MODEL=/tmp/mi-full
    "$PY" benchmarks/bench_encode.py --random-full "$MODEL" --device "$DEVICE" --skip-text --no-baseline \
        --batch-sizes 64,128 --compile                                    || echo "FAILED: bench_encode"
else
    "$PY" benchmarks/bench_encode.py "$MODEL" --device "$DEVICE" --skip-text --no-baseline --compile \
                                                                          || echo "FAILED: bench_encode"
fi
echo "--- CUDA-only tests (each skips without CUDA)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_pixel_path.py tests/test_vectors.py -k "cuda or gpu or compiled" \
                                                                          || echo "FAILED: tests"
echo "--- the pipeline's own ceiling on this machine's cores"
"$PY" benchmarks/bench_index.py --null-encoder "${PIPELINE_IMAGES:-4000}" --workers "$WORKERS" --batch-size 64 || echo "FAILED: null"
"$PY" benchmarks/bench_index.py --simulated-device 1000 --images "${PIPELINE_IMAGES:-4000}" --workers "$WORKERS" --batch-size 64 \
                                                                          || echo "FAILED: simulated"
echo "--- mi-index end to end on issue 8's mix against encode-only, both compiled; then eager with --fast-j2k"
"$PY" benchmarks/bench_index.py "$MODEL" --device "$DEVICE" --archive "$ARCHIVE" --workers "$WORKERS" \
    --batch-size 64 --compile                                             || echo "FAILED: archive"
"$PY" benchmarks/bench_index.py "$MODEL" --device "$DEVICE" --archive "$ARCHIVE" --workers "$WORKERS" \
    --batch-size 64 --fast-j2k                                            || echo "FAILED: archive fast-j2k"
