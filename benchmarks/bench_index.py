"""Indexing speed: end-to-end images/s next to encode-only images/s, and the time of an
unchanged re-run over 10,000 small files.

    python benchmarks/bench_index.py [MODEL_FOLDER] [--images 48] [--batch-size 8] [--workers 1]
                                     [--device cpu|cuda] [--dtype ...] [--unchanged-files 10000]
    python benchmarks/bench_index.py --null-encoder 2000 [--workers 1] [--batch-size 64]
    python benchmarks/bench_index.py [MODEL_FOLDER] --archive 120 [--fast-j2k] [--device cuda --compile]
    python benchmarks/bench_index.py --simulated-device 100 --images 2000 [--batch-size 64] [--workers 1]
    python benchmarks/bench_index.py [MODEL_FOLDER] --ray [--images 48]   # local vs through Ray
    python benchmarks/bench_index.py --dicomweb 200 [--workers 1] [--connections 4]   # and DIMSE

Default model: the tiny test fixture (offline). End-to-end = files on disk (1024x1024 16-bit
PNGs and real DICOM files, all distinct) -> decode in worker processes -> encode -> SQLite ->
FAISS, through `indexer.index_paths`. Encode-only = the same images already preprocessed in
memory, through `model.encode_resized` with the same batch size. Target: end-to-end >= 0.9x.
--archive N: issue 8's realistic mix (8-bit PNG, 16-bit DICOM, JPEG 2000), with each stage's
busy fraction. --simulated-device RATE: how busy the pipeline keeps a device of RATE images/s.
--dicomweb N: N distinct 1024x1024 16-bit DICOM instances indexed from a local Orthanc (over
DICOMweb, and over DIMSE) and from a folder of the same files, instances/s of each. Target:
PACS >= 0.8x folder.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import indexer  # noqa: E402
from encoders import load_model  # noqa: E402
from encoders.inference import PendingEmbeddings  # noqa: E402
from indexer.decode import decode_file  # noqa: E402
from indexer.options import decoding_workers  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "medimageinsight-tiny"


def make_images(folder: Path, count: int) -> None:
    """Distinct X-ray-sized 16-bit PNGs, plus real DICOM files (CR, MR, CT) when pydicom-data is there."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = (np.add.outer(np.arange(1024), np.arange(1024)) * 30).astype(np.uint16)
    for i in range(count):
        noise = rng.integers(0, 2000, (1024, 1024), dtype=np.uint16)
        Image.fromarray(base + noise).save(folder / f"xray{i:04d}.png")
    try:
        import data_store
        for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "MR2_UNCR.dcm", "CT2_J2KR.dcm"):
            source = Path(data_store.__file__).parent / "data" / name
            if source.exists():
                shutil.copy(source, folder / name)
    except ImportError:
        pass


def encode_only(model, folder: Path, batch_size: int) -> tuple[int, float]:
    """The encoder alone on the same images, decoded and resized beforehand: images and seconds."""
    resized = [model.preprocess.resize(image) for path in sorted(folder.iterdir())
               for _, image in decode_file(path).frames]
    model.encode_resized(resized[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(resized), batch_size):
        model.encode_resized(resized[i:i + batch_size])
    return len(resized), time.perf_counter() - start


def unchanged_rerun(model, root: Path, files: int) -> None:
    """Index one small image, add files-1 copies (reused by content hash, not encoded), then time
    the run that finds everything unchanged."""
    folder = root / "small"
    folder.mkdir()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(folder / "0.png")
    index_dir = root / "small-index"
    indexer.index_paths([folder], index_dir, model=model, workers=0)
    for i in range(1, files):
        sub = folder / f"{i // 1000:02d}"
        sub.mkdir(exist_ok=True)
        shutil.copy(folder / "0.png", sub / f"{i}.png")
    start = time.perf_counter()
    summary = indexer.index_paths([folder], index_dir, model=model)
    added = time.perf_counter() - start
    print(f"adding {files - 1} copies of an indexed file: {added:.2f} s "
          f"(encoded {summary['encoded']}, reused {summary['reused']})")
    start = time.perf_counter()
    summary = indexer.index_paths([folder], index_dir, model=model)
    in_process = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from indexer.cli import main; main()", str(folder), "--index",
                    str(index_dir), "--json"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    cli = time.perf_counter() - start
    print(f"unchanged re-run over {summary['unchanged']} files: {in_process:.2f} s in process, "
          f"{cli:.2f} s as a fresh `mi-index` command (encoded {summary['encoded']})")


class NullEncoder:
    """The real model's interface and preprocessing, but every embedding is zeros: what is left
    of a run is the pipeline's own cost (walking, decoding in workers, moving pixels, writing)."""

    def __init__(self, model) -> None:
        self.preprocess, self.dim, self.device, self.source = model.preprocess, model.dim, model.device, model.source
        self.fingerprint = model.fingerprint

    def encode_pixels(self, pixels) -> np.ndarray:
        return np.zeros((len(pixels), self.dim), np.float32)

    encode_resized = encode_pixels

    def start_encoding(self, resized) -> PendingEmbeddings:
        return PendingEmbeddings(torch.from_numpy(self.encode_resized(resized)), None)


class SimulatedDevice(NullEncoder):
    """A stand-in for a GPU that computes `rate` images/s: a batch is queued on one worker thread
    (one CUDA stream) that sleeps for the batch's time, and `start_encoding` returns at once, as
    it does on CUDA. `blocking=True` waits inside `start_encoding`: the pipeline as it was before
    batches overlapped, when the device waited for every commit and collation."""

    def __init__(self, model, rate: float, blocking: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor
        super().__init__(model)
        self.rate, self.blocking, self.busy = rate, blocking, 0.0
        self.stream = ThreadPoolExecutor(max_workers=1)

    def _compute(self, count: int) -> np.ndarray:
        time.sleep(count / self.rate)
        self.busy += count / self.rate
        return np.zeros((count, self.dim), np.float32)

    def start_encoding(self, resized):
        batch = self.preprocess.collate(resized)  # the host-side work a real start does
        future = self.stream.submit(self._compute, len(batch))
        if self.blocking:
            future.result()
        return future


def small_pngs(folder: Path, count: int) -> None:
    """Small 8-bit PNGs: decoding them keeps the workers ahead of the main process."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8)).save(folder / f"{i:05d}.png",
                                                                               compress_level=1)


def simulated_device(model, root: Path, count: int, rate: float, workers: int | None, batch_size: int) -> None:
    """Does the pipeline keep a device busy? A simulated device of `rate` images/s (no GPU needed),
    fed once by a main process that waits for every batch (before) and once with batches
    overlapped (now): end-to-end images/s as a fraction of the device's rate. Target >= 0.9x."""
    small_pngs(root / "sim", count)
    for blocking in (True, False, True, False):
        device = SimulatedDevice(model, rate, blocking)
        index_dir = root / "sim-index"
        start = time.perf_counter()
        summary = indexer.index_paths([root / "sim"], index_dir, model=device, batch_size=batch_size,
                                      workers=workers)
        wall = time.perf_counter() - start
        shutil.rmtree(index_dir)
        achieved = summary["encoded"] / wall
        print(f"simulated device {rate:.0f} images/s, {'waits for each batch' if blocking else 'overlapped     '}: "
              f"{achieved:.0f} images/s end to end = {achieved / rate:.2f}x, device busy "
              f"{device.busy / wall:.0%} ({workers} workers, batch {batch_size})")


def null_encoder(model, root: Path, count: int, workers: int | None, batch_size: int) -> None:
    """Main-process CPU milliseconds per image with a model that returns zeros (target <= 0.5 ms:
    room for 2,000 images/s)."""
    import resource

    folder = root / "null"
    small_pngs(folder, count)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    summary = indexer.index_paths([folder], root / "null-index", model=NullEncoder(model), batch_size=batch_size,
                                  workers=workers)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"null encoder: {summary['encoded']} images, main process {1000 * cpu / summary['encoded']:.2f} ms CPU "
          f"per image, {summary['encoded'] / wall:.0f} images/s wall ({workers} workers, batch {batch_size})")


def make_archive(folder: Path, count: int) -> dict[str, int]:
    """Issue 8's realistic mix, scaled to `count` files: per 3,364 files, 3,000 NIH-like 1024x1024
    8-bit PNGs and 364 MIMIC-like 2500x2048 16-bit DICOM (12 bits stored), 64 of them JPEG 2000
    lossless. Smooth anatomy-like gradients plus noise, all distinct."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    folder.mkdir(parents=True)
    dicoms = max(1, round(count * 364 / 3364))
    j2k = max(1, round(count * 64 / 3364))
    pngs = count - dicoms
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:1024, 0:1024]
    chest = (128 + 80 * np.sin(x / 90.0) * np.cos(y / 130.0)).astype(np.int16)
    for i in range(pngs):
        noise = rng.integers(-12, 12, (1024, 1024), dtype=np.int16)
        Image.fromarray(np.clip(chest + noise + i % 7, 0, 255).astype(np.uint8)).save(folder / f"nih{i:05d}.png")
    y, x = np.mgrid[0:2500, 0:2048]
    film = (1800 + 1200 * np.sin(x / 200.0) * np.cos(y / 260.0)).astype(np.int32)
    for i in range(dicoms):
        pixels = np.clip(film + rng.integers(-40, 40, film.shape) + i, 0, 4095).astype(np.uint16)
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality, ds.BodyPartExamined, ds.PatientID = "DX", "CHEST", f"P{i}"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        if i < j2k:
            ds.compress(JPEG2000Lossless, pixels)
        ds.save_as(folder / f"mimic{i:05d}.dcm", enforce_file_format=True)
    return {"png": pngs, "dicom": dicoms - j2k, "j2k": j2k}


def archive(model, root: Path, count: int, workers: int | None, batch_size: int, fast_j2k: bool,
            compiled: bool) -> None:
    """End to end on the realistic mix against encode-only, and how busy each stage was. With
    `compiled`, both go through the one compiled model (compiled by the first encode-only pass)."""
    mix = make_archive(root / "archive", count)
    print("archive: " + ", ".join(f"{n} {kind}" for kind, n in mix.items()))
    if compiled:
        from indexer.run.encode import inductor_cache
        model.compile(cache_dir=inductor_cache())
    workers = decoding_workers(workers)  # what the run will use: for the busy fraction
    # Alternating, best of two of each: other work on the machine moves single runs.
    encode_rate, rate, summary, wall = 0.0, 0.0, {}, 0.0
    for attempt in range(2):
        images, seconds = encode_only(model, root / "archive", batch_size)
        encode_rate = max(encode_rate, images / seconds)
        start = time.perf_counter()
        run = indexer.index_paths([root / "archive"], root / f"archive-index-{attempt}", model=model,
                                  batch_size=batch_size, workers=workers, fast_j2k=fast_j2k, compile="off")
        seconds = time.perf_counter() - start
        if run["encoded"] / seconds > rate:
            rate, summary, wall = run["encoded"] / seconds, run, seconds
    print(f"encode-only: {images} images, best {encode_rate:.2f} images/s")
    stage = summary["seconds"]
    print(f"end-to-end:  {summary['encoded']} images, best {wall:.2f} s = {rate:.2f} images/s = "
          f"{rate / encode_rate:.2f}x encode-only ({workers} workers, batch {batch_size}"
          f"{', --fast-j2k' if fast_j2k else ''}{', compiled' if compiled else ''}; target >= 0.9x)")
    print(f"busy: decoding workers {stage['read_decode_in_workers'] / (max(workers, 1) * wall):.0%} "
          f"(of {workers} x wall), encoding {stage['encode'] / wall:.0%}, writing {stage['write'] / wall:.0%}")


def local_vs_ray(model_folder: Path, root: Path, count: int, batch_size: int, workers: int | None) -> None:
    """The same files indexed locally and through Ray Data on this machine (a local cluster over
    its cores; model loading in each run included): the engine's overhead. Target >= 0.8x."""
    import ray

    make_images(root / "images", count)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"Ray {ray.__version__}: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs")
    try:
        rates = {}
        for label, options in (("local", {"workers": workers}), ("ray", {"ray": "local"})):
            start = time.perf_counter()
            summary = indexer.index_paths([root / "images"], root / f"index-{label}", model=str(model_folder),
                                          batch_size=batch_size, **options)
            seconds = time.perf_counter() - start
            rates[label] = summary["encoded"] / seconds
            print(f"{label:5s}: {summary['encoded']} images in {seconds:.2f} s = {rates[label]:.2f} images/s")
        print(f"through Ray / local: {rates['ray'] / rates['local']:.2f}x")
    finally:
        ray.shutdown()


def make_dicom_files(folder: Path, count: int) -> list[Path]:
    """Distinct X-ray-sized instances (16-bit CR, explicit VR little endian, own UIDs): studies of
    ten instances in two series, one patient each."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    import pydicom

    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    base = (np.add.outer(np.arange(1024), np.arange(1024)) * 2).astype(np.uint16)
    paths = []
    for i in range(count):
        if i % 10 == 0:
            study, series = generate_uid(), [generate_uid(), generate_uid()]
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series[i % 2]
        ds.Modality, ds.BodyPartExamined, ds.StudyDate, ds.PatientID = "CR", "CHEST", "20200101", f"P{i // 10}"
        ds.Rows = ds.Columns = 1024
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (base + rng.integers(0, 2000, (1024, 1024), dtype=np.uint16)).astype(np.uint16).tobytes()
        path = folder / f"cr{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dicomweb_against_folder(model, root: Path, count: int, workers: int | None, batch_size: int,
                            connections: int) -> None:
    """Instances/s from a local Orthanc over DICOMweb (and DIMSE) next to the same files from a folder."""
    sys.path.insert(0, str(REPO / "tests"))
    from orthanc_server import MISSING, Orthanc

    if MISSING:
        sys.exit(MISSING)
    files = make_dicom_files(root / "files", count)
    server = Orthanc(root / "orthanc", extra={"DicomModalities": {"mi": ["MI-INDEX", "127.0.0.1", 1]}}).start()
    try:
        upload_start = time.perf_counter()
        assert all(server.upload(path) for path in files)
        print(f"uploaded {count} instances to Orthanc in {time.perf_counter() - upload_start:.1f} s")
        # Alternating, best of two: other work on the machine moves single runs a lot. With the
        # null encoder, what is left is each transport's own cost (listing, reading, decoding).
        for label, encoder in (("model", model), ("null encoder", NullEncoder(model))):
            best: dict[str, float] = {}
            for attempt in range(2):
                for name in ("folder", "dicomweb", "dimse"):
                    index_dir = root / f"{name}-{label}-{attempt}"
                    start = time.perf_counter()
                    if name == "folder":
                        summary = indexer.index_paths([root / "files"], index_dir, model=encoder,
                                                      batch_size=batch_size, workers=workers)
                    elif name == "dicomweb":
                        summary = indexer.index_dicomweb(server.url, index_dir, model=encoder, batch_size=batch_size,
                                                         workers=workers, connections=connections)
                    else:
                        summary = indexer.index_dimse(server.dimse_url, index_dir, model=encoder, batch_size=batch_size,
                                                      workers=workers, connections=connections)
                    seconds = time.perf_counter() - start
                    assert summary["new"] == count, summary
                    best[name] = max(best.get(name, 0.0), count / seconds)
                    shutil.rmtree(index_dir)
            print(f"{label:12s}: folder {best['folder']:.1f} instances/s, dicomweb {best['dicomweb']:.1f} "
                  f"instances/s = {best['dicomweb'] / best['folder']:.2f}x (target >= 0.8x), dimse "
                  f"{best['dimse']:.1f} instances/s = {best['dimse'] / best['folder']:.2f}x")
        index_dir = root / "pacs-index"
        indexer.index_dicomweb(server.url, index_dir, model=NullEncoder(model), workers=workers)
        start = time.perf_counter()
        again = indexer.index_dicomweb(server.url, index_dir, model=NullEncoder(model), workers=workers)
        print(f"dicomweb re-run: {again['unchanged']} unchanged instances listed in {time.perf_counter() - start:.2f} s "
              f"({workers} workers, batch {batch_size}, {connections} connections)")
        indexer.index_dimse(server.dimse_url, root / "dimse-index", model=NullEncoder(model), workers=workers)
        start = time.perf_counter()
        again = indexer.index_dimse(server.dimse_url, root / "dimse-index", model=NullEncoder(model), workers=workers)
        print(f"dimse re-run: {again['unchanged']} unchanged instances listed in {time.perf_counter() - start:.2f} s")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=FIXTURE)
    parser.add_argument("--images", type=int, default=48, help="16-bit PNGs to index (plus a few DICOM files)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--unchanged-files", type=int, default=10_000)
    parser.add_argument("--null-encoder", type=int, metavar="N", default=0,
                        help="only measure the pipeline's own cost over N images, with a model returning zeros")
    parser.add_argument("--archive", type=int, metavar="N", default=0,
                        help="only index N files of issue 8's mix (8-bit PNG, 16-bit DICOM, JPEG 2000)")
    parser.add_argument("--fast-j2k", action="store_true", help="with --archive: mi-index --fast-j2k")
    parser.add_argument("--compile", action="store_true", help="with --archive: both through torch.compile")
    parser.add_argument("--simulated-device", type=float, metavar="RATE", default=0,
                        help="only measure how busy the pipeline keeps a simulated device of RATE images/s")
    parser.add_argument("--ray", action="store_true", help="only compare a local run with one through Ray Data")
    parser.add_argument("--dicomweb", type=int, metavar="N", default=0,
                        help="instances/s over DICOMweb from a local Orthanc against a folder of the same N files")
    parser.add_argument("--connections", type=int, default=4, help="with --dicomweb: concurrent retrievals")
    args = parser.parse_args()
    if args.ray:
        with tempfile.TemporaryDirectory() as tmp:
            return local_vs_ray(args.model, Path(tmp), args.images, args.batch_size, args.workers)

    model = load_model(args.model, device=args.device, dtype=args.dtype, towers=("image",))
    print(f"model {args.model}  device {model.device}  dtype {model.dtype}  batch {args.batch_size}  "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.null_encoder:
            return null_encoder(model, root, args.null_encoder, args.workers, args.batch_size)
        if args.archive:
            return archive(model, root, args.archive, args.workers, args.batch_size, args.fast_j2k, args.compile)
        if args.simulated_device:
            return simulated_device(model, root, args.images, args.simulated_device, args.workers, args.batch_size)
        if args.dicomweb:
            return dicomweb_against_folder(model, root, args.dicomweb, args.workers, args.batch_size,
                                           args.connections)
        make_images(root / "images", args.images)
        count, seconds = encode_only(model, root / "images", args.batch_size)
        print(f"encode-only: {count} images in {seconds:.2f} s = {count / seconds:.2f} images/s")
        start = time.perf_counter()
        summary = indexer.index_paths([root / "images"], root / "index", model=model, batch_size=args.batch_size,
                                      workers=args.workers)
        total = time.perf_counter() - start
        rate = summary["encoded"] / total
        print(f"end-to-end:  {summary['encoded']} images in {total:.2f} s = {rate:.2f} images/s "
              f"({rate / (count / seconds):.2f}x encode-only); stages: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in summary["seconds"].items()))
        unchanged_rerun(model, root, args.unchanged_files)


if __name__ == "__main__":
    main()
