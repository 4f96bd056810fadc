"""A real OHIF viewer for the tests: its built `dist/` from the npm package `@ohif/app` (fetched once
with `npm pack` into a cache folder under /tmp), served on a free loopback port by a tiny static
server with OHIF's SPA fallback (any unknown path answers index.html), our own app-config.js, and
/dicom-web forwarded to a test Orthanc, so that the viewer and its DICOMweb source share one origin
(no CORS)."""
from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

OHIF_VERSION = "3.13.2"  # pinned: a test that fetches "latest" would change under us
CACHE = Path(os.environ.get("MI_TEST_OHIF_CACHE", "/tmp/mi-test-ohif"))
PROXIED = ("/dicom-web/", "/wado")

APP_CONFIG = """window.config = {
  routerBasename: '/', extensions: [], modes: [], showStudyList: true, showLoadingIndicator: false,
  showCPUFallbackMessage: false, showWarningMessageForCrossOrigin: false, investigationalUseDialog: {option: 'never'},
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb', sourceName: 'orthanc',
    configuration: {
      friendlyName: 'test Orthanc', name: 'orthanc',
      wadoUriRoot: window.location.origin + '/wado', qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web', qidoSupportsIncludeField: false,
      imageRendering: 'wadors', thumbnailRendering: 'wadors', enableStudyLazyLoad: true,
      supportsFuzzyMatching: false, supportsWildcard: true, omitQuotationForMultipartRequest: true,
      bulkDataURI: {enabled: true},
    },
  }],
};
"""


class Unavailable(Exception):
    """OHIF's dist cannot be had here (no npm, no registry): the test skips with this reason."""


def ohif_dist() -> Path:
    """The folder of OHIF's built viewer, fetched and unpacked once."""
    dist = CACHE / OHIF_VERSION / "package" / "dist"
    if (dist / "index.html").exists():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("npm is not installed (apt-get install npm): cannot fetch @ohif/app")
    folder = CACHE / OHIF_VERSION
    folder.mkdir(parents=True, exist_ok=True)
    tarball = folder / f"ohif-app-{OHIF_VERSION}.tgz"
    if not tarball.exists():
        done = subprocess.run([npm, "pack", f"@ohif/app@{OHIF_VERSION}"], cwd=folder, capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0 or not tarball.exists():
            raise Unavailable(f"npm pack @ohif/app@{OHIF_VERSION} failed: {done.stderr.strip()[-300:]}")
    with tarfile.open(tarball) as archive:
        archive.extractall(folder, members=[m for m in archive.getmembers() if m.name.startswith("package/dist/")],
                           filter="data")
    return dist


class ViewerServer:
    """OHIF on http://127.0.0.1:PORT, its DICOMweb calls forwarded to `orthanc_root`."""

    def __init__(self, dist: Path, orthanc_root: str):
        handler = _handler(dist, orthanc_root)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ViewerServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(dist: Path, orthanc_root: str) -> type:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(dist), **kwargs)

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith(PROXIED):
                return self._forward()
            if path == "/app-config.js":
                return self._send(APP_CONFIG.encode(), "application/javascript")
            local = dist / path.lstrip("/")
            if path != "/" and not local.resolve().is_relative_to(dist.resolve()):
                return self.send_error(404)
            if path == "/" or not local.is_file():
                self.path = "/index.html"  # the SPA's routes (/viewer?...) are the page's, not files
            return super().do_GET()

        def _forward(self) -> None:
            request = urllib.request.Request(orthanc_root + self.path,
                                             headers={"Accept": self.headers.get("Accept", "*/*")})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    body, status, kind = answer.read(), answer.status, answer.headers.get("Content-Type")
            except urllib.error.HTTPError as error:
                body, status, kind = error.read(), error.code, error.headers.get("Content-Type")
            self._send(body, kind or "application/octet-stream", status)

        def _send(self, body: bytes, kind: str, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
