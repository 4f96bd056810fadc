"""The DICOM receiver (`mi receive`) against real senders: DCMTK's storescu, pynetdicom's storescu
app and a real Orthanc each send pydicom's and pydicom-data's files in their own transfer
syntaxes; each instance is then kept as sent under STORE/<study>/<series>/<sop>.dcm and an image
search with the same file finds it first. Also: callers not on the allow list rejected at
association, a malformed dataset and a path-traversal UID refused with a failure status (the
receiver goes on), a full disk answered 0xA700 with nothing lost, a kill -9 mid-association then
a restart that indexes what STORE holds. Receivers run as real processes on free loopback ports,
stopped by PID."""
from __future__ import annotations

import io
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError

import data_store
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from raw_sqlite import fetch_rows

REPO = Path(__file__).parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "medimageinsight-tiny"
DATA_STORE = Path(data_store.__file__).parent / "data"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
STORESCU = Path("/usr/bin/storescu")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

# DCMTK's storescu proposes only uncompressed syntaxes unless told which to propose: one run per flag.
SENT_BY_DCMTK = {
    "-xw": [DATA_STORE / "RG3_J2KI.dcm"],                                   # CR, JPEG 2000 lossy
    "-xv": [DATA_STORE / "US1_J2KR.dcm"],                                   # US, JPEG 2000 lossless
    "-xe": [PYDICOM_FILES / "CT_small.dcm"],                                # CT, explicit little endian
    "-xr": [PYDICOM_FILES / "MR_small_RLE.dcm", DATA_STORE / "OBXXXX1A_rle_2frame.dcm"],  # RLE; US multi-frame
    "-xd": [PYDICOM_FILES / "image_dfl.dcm"],                               # deflate
    "-xt": [DATA_STORE / "emri_small_jpeg_ls_lossless.dcm"],                # enhanced MR, JPEG-LS
    "-xy": [PYDICOM_FILES / "SC_rgb_jpeg_dcmtk.dcm"],                       # secondary capture, JPEG baseline
    "-xs": [DATA_STORE / "JPGLosslessP14SV1_1s_1f_8b.dcm"],                 # JPEG lossless SV1
}
SENT_BY_PYNETDICOM = [DATA_STORE / name for name in ("RG1_J2KR.dcm", "MR2_J2KI.dcm", "693_J2KR.dcm",
                                                     "emri_small_RLE.dcm", "US1_UNCR.dcm")] + \
    [PYDICOM_FILES / "JPEG2000.dcm"]
SENT_BY_ORTHANC = [PYDICOM_FILES / "MR_small.dcm", DATA_STORE / "693_UNCI.dcm", PYDICOM_FILES / "SC_rgb_jpeg_gdcm.dcm",
                   DATA_STORE / "RG1_J2KI.dcm", DATA_STORE / "color3d_jpeg_baseline.dcm"]


# ---------------------------------------------------------------- a receiver process
@dataclass
class Running:
    process: subprocess.Popen
    port: int
    store: Path
    index: Path
    lines: list[str] = field(default_factory=list)

    def log(self) -> str:
        return "\n".join(self.lines)


def start_receiver(tmp_path: Path, *args: str, store: Path | None = None, index: Path | None = None) -> Running:
    store, index = store or tmp_path / "store", index or tmp_path / "index"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MI_MODEL", None)
    env.pop("MI_INDEX", None)
    process = subprocess.Popen([sys.executable, "-c", "from indexer.receive_cli import entry; entry()",
                                "--store", str(store), "--index", str(index), "--model", str(FIXTURE),
                                "--port", "0", *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, text=True)
    running = Running(process, 0, store, index)
    started: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stderr:
            running.lines.append(line.rstrip("\n"))
            if " receiving on " in line:
                started.put(int(line.split(" receiving on ")[1].split(" ")[0].rsplit(":", 1)[1]))
        started.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        port = started.get(timeout=120)
    except queue.Empty:
        port = None
    if port is None:
        stop_receiver(running, signal.SIGKILL)
        raise AssertionError(f"the receiver did not start:\n{running.log()}")
    running.port = port
    return running


def stop_receiver(running: Running, sig: int = signal.SIGTERM) -> int:
    if running.process.poll() is None:
        os.kill(running.process.pid, sig)
    try:
        return running.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(running.process.pid, signal.SIGKILL)
        return running.process.wait()


@pytest.fixture
def receivers():
    started: list[Running] = []
    yield started
    for running in started:
        stop_receiver(running, signal.SIGKILL)


# ---------------------------------------------------------------- checks
def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def kept_at(store: Path, path: Path) -> Path:
    study, series, instance = uids(path)
    return store / study / series / f"{instance}.dcm"


def indexed_uids(index: Path) -> set[str]:
    try:
        return {row[0] for row in fetch_rows(index, "SELECT sop_instance_uid FROM images", readonly=True)}
    except sqlite3.Error:
        return set()


def wait_until_indexed(running: Running, files: list[Path], bound: float = 120) -> None:
    """Wait (at most `bound` seconds: a bound, not a timing) until every file's instance is indexed."""
    wanted = {uids(path)[2] for path in files}
    deadline = time.monotonic() + bound
    while not wanted <= indexed_uids(running.index):
        assert running.process.poll() is None, running.log()
        assert time.monotonic() < deadline, f"not indexed: {wanted - indexed_uids(running.index)}\n{running.log()}"
        time.sleep(0.2)


def assert_kept_as_sent_and_found_first(running: Running, files: list[Path]) -> None:
    from encoders import load_model
    from retrieval import Searcher

    for path in files:
        kept = kept_at(running.store, path)
        sent, received = pydicom.dcmread(path), pydicom.dcmread(kept)
        assert received.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, path.name  # not transcoded
        assert received.PixelData == sent.PixelData, path.name
        assert (kept.stat().st_mode & 0o777) == 0o600, path.name
    model = load_model(FIXTURE, device="cpu", towers=("image", "text"))
    with Searcher(running.index, model=model) as searcher:
        for path in files:
            hit = searcher.search(image=path, k=1)[0]
            assert hit.metadata["sop_instance_uid"] == uids(path)[2], path.name
            assert Path(hit.path) == kept_at(running.store, path).resolve(), path.name


def store_with_pynetdicom(port: int, *datasets: Dataset | Path, calling: str = "TESTSCU", called: str = "MI",
                          keep_open: bool = False):
    """The statuses of C-STOREs of `datasets` over one association (left open with keep_open)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for item in datasets:
        meta = item.file_meta if isinstance(item, Dataset) else pydicom.dcmread(item, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association not established"
    statuses = [int(assoc.send_c_store(item).Status) for item in datasets]
    if keep_open:
        return statuses, assoc
    assoc.release()
    return statuses


def ct_dataset(study: str | None = None, series: str | None = None, instance: str | None = None) -> Dataset:
    """A small CT image no one else sends (its own UIDs unless given)."""
    import numpy as np

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = instance or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), series or generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CT", 32, 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.random.default_rng(abs(hash(ds.SOPInstanceUID)) % 2**32)
                    .integers(0, 4096, (32, 32), dtype=np.uint16).tobytes())
    return ds


def written(ds: Dataset, folder: Path) -> Path:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- senders
@pytest.mark.skipif(not STORESCU.exists(), reason="DCMTK's storescu is not installed")
def test_dcmtk_storescu_in_eight_transfer_syntaxes(tmp_path, receivers):
    receivers.append(running := start_receiver(tmp_path))
    for flag, files in SENT_BY_DCMTK.items():
        sent = subprocess.run([str(STORESCU), "-R", flag, "-aet", "MODALITY", "-aec", "MI", "127.0.0.1",
                               str(running.port), *map(str, files)], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, (flag, sent.stdout, sent.stderr)
    files = [path for group in SENT_BY_DCMTK.values() for path in group]
    wait_until_indexed(running, files)
    assert_kept_as_sent_and_found_first(running, files)


def test_pynetdicom_storescu_app(tmp_path, receivers):
    receivers.append(running := start_receiver(tmp_path, "--ae-title", "AI-NODE"))
    sent = subprocess.run([sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(running.port),
                           *map(str, SENT_BY_PYNETDICOM), "-cx", "-aet", "PACS", "-aec", "AI-NODE"],
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0 and "E:" not in sent.stderr, sent.stderr
    wait_until_indexed(running, SENT_BY_PYNETDICOM)
    assert_kept_as_sent_and_found_first(running, SENT_BY_PYNETDICOM)


def test_orthanc_routes_a_study_to_the_receiver(tmp_path, receivers):
    from orthanc_server import MISSING, Orthanc, stocked
    if MISSING:
        pytest.skip(MISSING)
    receivers.append(running := start_receiver(tmp_path, "--allow", "ORTHANC@127.0.0.1"))
    orthanc = Orthanc(tmp_path / "orthanc",
                      extra={"DicomModalities": {"mi": ["MI", "127.0.0.1", running.port]}}).start()
    try:
        ids = stocked(orthanc, SENT_BY_ORTHANC)
        assert len(ids) == len(SENT_BY_ORTHANC)
        try:
            answer = orthanc.request("POST", "/modalities/mi/store", json.dumps(list(ids.values())).encode())
        except HTTPError as e:
            raise AssertionError(f"{e}: {e.read()!r}\n{(orthanc.folder / 'orthanc.log').read_text()[-3000:]}"
                                 f"\n{running.log()}") from None
        assert answer.get("FailedInstancesCount", 0) == 0, answer
    finally:
        orthanc.stop()
    wait_until_indexed(running, SENT_BY_ORTHANC)
    assert_kept_as_sent_and_found_first(running, SENT_BY_ORTHANC)


# ---------------------------------------------------------------- refusals
def test_callers_not_on_the_allow_list_are_rejected_at_association(tmp_path, receivers):
    (tmp_path / "callers.txt").write_text("# who may send\nPACS@127.0.0.1\n\nFARAWAY@192.0.2.7\n")
    receivers.append(running := start_receiver(tmp_path, "--allow-file", str(tmp_path / "callers.txt"),
                                               "--allow", "CT1@localhost"))
    from pynetdicom import AE

    def outcome(calling: str, called: str = "MI") -> str:
        ae = AE(ae_title=calling)
        ae.add_requested_context(CT_IMAGE)
        assoc = ae.associate("127.0.0.1", running.port, ae_title=called)
        result = "established" if assoc.is_established else "rejected" if assoc.is_rejected else "other"
        if assoc.is_established:
            assoc.release()
        return result

    assert outcome("PACS") == outcome("CT1") == "established"
    assert outcome("STRANGER") == "rejected"
    assert outcome("FARAWAY") == "rejected"           # allowed, but from another host
    assert outcome("PACS", called="SOMEONE") == "rejected"  # not our AE title
    if STORESCU.exists():
        sent = subprocess.run([str(STORESCU), "-aet", "STRANGER", "-aec", "MI", "127.0.0.1", str(running.port),
                               str(PYDICOM_FILES / "CT_small.dcm")], capture_output=True, text=True, timeout=60)
        assert sent.returncode != 0 and "Association Rejected" in sent.stderr, sent.stderr
    assert not running.store.exists() or not any(running.store.iterdir())
    assert "refused an association from STRANGER" in running.log()


def test_malformed_dataset_and_path_traversal_uid_get_failure_statuses(tmp_path, receivers, monkeypatch):
    from pynetdicom import _config
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # a file's bytes sent as they are
    receivers.append(running := start_receiver(tmp_path))
    # A truncated transfer: valid file meta, a SOP Instance UID, then an element claiming 4 GB
    good = ct_dataset()
    raw = io.BytesIO()
    good.save_as(raw, enforce_file_format=True)
    meta_end = raw.getvalue().index(b"\x08\x00\x16\x00")  # (0008,0016) SOP Class UID: the dataset's start
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(raw.getvalue()[:meta_end] + b"\x08\x00\x18\x00UI\x06\x001.2.3\x00"
                       + b"\x10\x00\x10\x00OB\x00\x00\xf0\xff\xff\xff" + b"x" * 8)
    hostile = written(ct_dataset(study="../../../../tmp/escaped"), tmp_path / "sent")
    too_long = written(ct_dataset(series="1." + "2" * 70), tmp_path / "sent")
    statuses = store_with_pynetdicom(running.port, broken, hostile, too_long, written(good, tmp_path / "sent"))
    assert 0xC000 <= statuses[0] <= 0xCFFF and statuses[1] == statuses[2] == 0xC001 and statuses[3] == 0
    assert not list(tmp_path.glob("**/escaped*")) and not Path("/tmp/escaped").exists()
    assert sorted(p.relative_to(running.store) for p in running.store.rglob("*") if p.is_file()) == \
        [Path(good.StudyInstanceUID, good.SeriesInstanceUID, f"{good.SOPInstanceUID}.dcm")]
    log = running.log()
    assert log.count("refused a malformed dataset from TESTSCU") == 1 and log.count("is not a UID") == 2
    assert "Traceback" not in log and "UserWarning" not in log
    # ...and the receiver goes on receiving and indexing
    again = ct_dataset()
    assert store_with_pynetdicom(running.port, again) == [0]
    path = written(again, tmp_path / "sent")
    wait_until_indexed(running, [path])
    assert_kept_as_sent_and_found_first(running, [path])


FULL_DISK = Path("/tmp") / f"mi-receiver-full-{os.getpid()}"


@pytest.fixture
def small_disk():
    """A 3 MB tmpfs (root only; skipped elsewhere)."""
    FULL_DISK.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(FULL_DISK)],
                             capture_output=True).returncode == 0
    if not mounted:
        FULL_DISK.rmdir()
        pytest.skip("cannot mount a small tmpfs here (not root)")
    yield FULL_DISK
    subprocess.run(["umount", "-l", str(FULL_DISK)], check=False)
    FULL_DISK.rmdir()


def test_a_full_disk_answers_out_of_resources_and_loses_nothing(tmp_path, receivers, small_disk):
    receivers.append(running := start_receiver(tmp_path, store=small_disk / "store"))
    small = [PYDICOM_FILES / "CT_small.dcm", PYDICOM_FILES / "MR_small.dcm"]
    big = DATA_STORE / "RG1_UNCR.dcm"  # 7 MB: more than the disk holds
    statuses = store_with_pynetdicom(running.port, *small, big)
    assert statuses == [0, 0, 0xA700]
    assert not kept_at(running.store, big).exists()
    assert not [p for p in running.store.rglob("*") if p.name.startswith(".")]  # no partial file left
    assert "is full (the sender may retry)" in running.log()
    wait_until_indexed(running, small)
    assert_kept_as_sent_and_found_first(running, small)


def test_kill_9_mid_association_then_restart_indexes_what_store_holds(tmp_path, receivers):
    # Batches only at the end of an association: the kill comes before anything is indexed
    first = start_receiver(tmp_path, "--batch-seconds", "3600", "--batch-files", "100000")
    receivers.append(first)
    files = [PYDICOM_FILES / "CT_small.dcm", DATA_STORE / "US1_J2KR.dcm", PYDICOM_FILES / "MR_small_RLE.dcm"]
    statuses, assoc = store_with_pynetdicom(first.port, *files, keep_open=True)
    assert statuses == [0, 0, 0]
    stop_receiver(first, signal.SIGKILL)
    assoc.abort()
    assert all(kept_at(first.store, path).exists() for path in files)  # acknowledged: on disk
    assert not indexed_uids(first.index) & {uids(path)[2] for path in files}
    leftover = kept_at(first.store, files[0]).with_name(".arriving-interrupted.dcm.1.2.tmp")
    leftover.write_bytes(b"half an instance")

    receivers.append(second := start_receiver(tmp_path))
    wait_until_indexed(second, files)
    assert_kept_as_sent_and_found_first(second, files)
    assert not leftover.exists()
    assert stop_receiver(second) == 0  # SIGTERM: a clean stop


# ---------------------------------------------------------------- the command line
def test_listening_beyond_loopback_needs_an_allow_list(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    refused = subprocess.run([sys.executable, "-c", "from indexer.receive_cli import entry; entry()",
                              "--store", str(tmp_path / "store"), "--index", str(tmp_path / "index"),
                              "--host", "0.0.0.0", "--port", "0"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 1 and "needs --allow or --allow-file" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "store").exists()
    from click.testing import CliRunner

    from retrieval.commands import mi
    helped = CliRunner().invoke(mi, ["receive", "--help"])
    assert helped.exit_code == 0 and "--allow" in helped.output


def test_tls_when_given_a_certificate_and_key(tmp_path, receivers):
    import ssl

    from pynetdicom import AE
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                           "/CN=localhost", "-keyout", str(tmp_path / "node.key"), "-out", str(tmp_path / "node.pem")],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("openssl cannot make a certificate here")
    receivers.append(running := start_receiver(tmp_path, "--tls-cert", str(tmp_path / "node.pem"),
                                               "--tls-key", str(tmp_path / "node.key")))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "node.pem"))
    client.check_hostname = False
    ds = ct_dataset()
    ae = AE(ae_title="SECURE")
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="MI", tls_args=(client, None))
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    plain = ae.associate("127.0.0.1", running.port, ae_title="MI")  # no TLS: no association
    assert not plain.is_established
    path = written(ds, tmp_path / "sent")
    wait_until_indexed(running, [path])
    assert_kept_as_sent_and_found_first(running, [path])
