"""A real Orthanc with its DICOMweb plugin, on free loopback ports in a temporary folder: for
the PACS tests and `benchmarks/bench_index.py --dicomweb`. Started by its binary, stopped by
its PID."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError, URLError

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
    http_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        """The DICOMweb service as mi-index names it."""
        return f"dicomweb+{self.root}/dicom-web"

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        config = {
            "Name": "mi-test", "HttpPort": self.http_port, "DicomPort": free_port(),
            "StorageDirectory": str(self.folder / "storage"), "IndexDirectory": str(self.folder / "storage"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users, "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{self.http_port}"},
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
