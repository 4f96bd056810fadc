"""A real Orthanc with its DICOMweb plugin, on free loopback ports in a temporary folder, and the
real DICOM files the PACS tests give it: for the PACS tests and `benchmarks/bench_index.py
--dicomweb`. Started by its binary, stopped by its PID."""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError, URLError

import pydicom

from indexer.store import IndexStore

from raw_sqlite import raw_db

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MISSING = (None if ORTHANC.exists() and DICOMWEB_PLUGIN.exists() else
           "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
           ".ci/run installs them)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    folder: Path
    users: dict[str, str] = field(default_factory=dict)   # RegisteredUsers: authentication on when any
    extra: dict = field(default_factory=dict)            # more configuration (DIMSE permissions, say)
    http_port: int = 0
    dicom_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        """The DICOMweb service as mi-index names it."""
        return f"dicomweb+{self.root}/dicom-web"

    @property
    def dimse_url(self) -> str:
        return f"dimse://ORTHANC@127.0.0.1:{self.dicom_port}"

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        config = {
            "Name": "mi-test", "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "StorageDirectory": str(self.folder / "storage"), "IndexDirectory": str(self.folder / "storage"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users, "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{self.http_port}"},
            **self.extra,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([str(ORTHANC), str(self.folder / "orthanc.json")], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.request("GET", "/system")
                return self
            except (URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def request(self, method: str, path: str, data: bytes | None = None) -> dict | list:
        request = urllib.request.Request(self.root + path, data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else {}

    def upload(self, path: Path) -> str | None:
        """Orthanc's id of the uploaded instance, None when Orthanc refuses the file."""
        try:
            return self.request("POST", "/instances", Path(path).read_bytes())["ID"]
        except HTTPError:
            return None

    def delete(self, orthanc_id: str) -> None:
        self.request("DELETE", f"/instances/{orthanc_id}")


@functools.lru_cache
def dicom_files(limit: int = 10) -> list[Path]:
    """Small real DICOM images that mi-index decodes, with distinct SOP Instance UIDs (the PACS
    keys an instance by it)."""
    chosen, uids = [], set()
    for path in sorted(PYDICOM_FILES.glob("*.dcm")):
        if path.stat().st_size > 300_000:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False, force=True)
            uid = str(ds.SOPInstanceUID)
        except Exception:
            continue
        if "PixelData" in ds and uid not in uids and ds.get("Modality") and _decodes(path):
            chosen.append(path)
            uids.add(uid)
        if len(chosen) == limit:
            break
    return chosen


def _decodes(path: Path) -> bool:
    from indexer.decode import DecodeError, decode_file

    try:
        decode_file(path)
        return True
    except DecodeError:
        return False


def stocked(orthanc: Orthanc, files: list[Path], folder: Path | None = None) -> dict[Path, str]:
    """Upload `files` ({file: Orthanc's id} of those Orthanc takes), copying them to `folder`."""
    ids = {}
    for path in files:
        orthanc_id = orthanc.upload(path)
        if orthanc_id is not None:
            ids[path] = orthanc_id
            if folder is not None:
                folder.mkdir(exist_ok=True)
                shutil.copy(path, folder / path.name)
    return ids


def rows(index_dir: Path) -> dict[str, dict]:
    """{sop_instance_uid: stored fields and embedding}, after checking there are no duplicates."""
    with raw_db(index_dir) as db:
        db.row_factory = sqlite3.Row
        found = [dict(row) for row in db.execute("SELECT * FROM images")]
    assert len({(row["path"], row["frame"]) for row in found}) == len(found), "duplicate images"
    with IndexStore.open(index_dir, readonly=True) as store:
        for row, vector in zip(found, store.vectors([row["id"] for row in found])):
            row["embedding"] = vector
    return {row["sop_instance_uid"]: row for row in found}
