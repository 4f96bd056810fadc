"""create_app: the FastAPI application over one index, its state (the index, its warm Searcher, the token) and
its one-line errors."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from indexer.errors import MIError, one_line

from . import viewer, workspace
from .routes import router


class WarmSearcher:
    """The app's one Searcher, opened on first need, and again while the index is missing or empty (once it has
    images); every thread gets the same one."""

    def __init__(self, index_dir: Path, model: Any, device: str | None) -> None:
        self.index_dir, self.model, self.device = index_dir, model, device
        self._searcher = None
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        from ..search import Searcher

        with self._lock:
            if self._searcher is None:
                self._searcher = Searcher(self.index_dir, model=self.model, device=self.device)
            return self._searcher


def create_app(index_dir: str | os.PathLike, *, model: Any = None, device: str | None = None,
               token: str | None = None) -> FastAPI:
    """The FastAPI application serving `index_dir`. `model`: as `Searcher`'s (a folder, a hub
    id, a loaded encoder, or None for the index's); `token`: required on every API call if set."""
    app = FastAPI(title="medimageinsight-search", description="Search an index of X-rays and DICOM files by "
                  "text or by example image.", version="1")
    app.state.index_dir = Path(index_dir).expanduser().resolve()
    app.state.searcher = WarmSearcher(app.state.index_dir, model, device)
    app.state.token = token
    app.add_exception_handler(MIError, _as_one_line)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.include_router(router)
    app.include_router(workspace.router)
    app.include_router(viewer.router)
    return app


async def _as_one_line(_request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"error": one_line(error)}, status_code=400)


async def _invalid(_request: Request, error: Exception) -> JSONResponse:
    errors = error.errors() if isinstance(error, RequestValidationError) else []
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "form"))
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}".strip(": ")}, status_code=422)


async def _http_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)
