"""create_app: the FastAPI application over one index, its state (the index, its warm Searcher, the token, the
thumbnail renderer), its gate (limits.RequestGate), its docs served from the package, and its one-line errors."""
from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.errors import MIError, one_line

from . import checks, viewer, workspace
from .json_response import AsciiJSONResponse
from .limits import RequestGate
from .routes import router
from .thumbnails import ThumbnailRenderer
from .uploads import as_sent

SWAGGER_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}  # in static/


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
               token: str | None = None, hosts: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI application serving `index_dir`. `model`: as `Searcher`'s (a folder, a hub
    id, a loaded encoder, or None for the index's); `token`: required on every API call if set; `hosts`: the
    names the server listens as (mi-serve's --host): other Host headers are refused (DNS rebinding), the
    localhost forms always accepted; None: no Host check (a test client)."""
    app = FastAPI(title="medimageinsight-search", description="Search an index of X-rays and DICOM files by "
                  "text or by example image.", version="1", docs_url=None, redoc_url=None,
                  default_response_class=AsciiJSONResponse, lifespan=_lifespan)
    app.state.index_dir = Path(index_dir).expanduser().resolve()
    app.state.searcher = WarmSearcher(app.state.index_dir, model, device)
    app.state.token = token
    app.state.thumbnails = ThumbnailRenderer(app.state.index_dir)
    app.add_exception_handler(MIError, _as_one_line)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # FastAPI's and Starlette's own (a bad form)
    app.add_middleware(RequestGate, token=token, hosts=hosts)
    app.include_router(router)
    app.include_router(workspace.router)
    app.include_router(checks.router)
    app.include_router(viewer.router)
    app.add_api_route("/docs", _docs, include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route("/docs/static/{name}", _docs_asset, include_in_schema=False)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.thumbnails.close()  # a thumbnail stuck on a slow PACS must not hold the exit


def check_model_source(index_dir: Path, model: Any) -> None:
    """Before serving: the model the server will load (`model`, MI_MODEL or the index's) resolved and its
    identity read (no weights loaded) and compared with the index's, so a wrong --model is one line at start-up,
    not a 500 at the first search. MIError or the encoder's ModelError when it cannot be used."""
    from indexer.errors import IndexNotFoundError, ModelMismatchError
    from indexer.model_choice import chosen_model_source
    from indexer.store import IndexStore

    if hasattr(model, "encode_texts"):
        return  # a loaded encoder: Searcher checks it
    try:
        store = IndexStore.open(index_dir, readonly=True)
    except IndexNotFoundError:
        return  # served as missing (the page says so); nothing to compare with yet
    try:
        recorded = store.model_info or {}
    finally:
        store.close()
    from encoders.inference import describe_model

    source = chosen_model_source(model, recorded.get("source"))
    found = describe_model(source)
    same_dim = recorded.get("dim") in (None, found["dim"])
    if not (same_dim and recorded.get("fingerprint") in (None, found["fingerprint"])):
        raise ModelMismatchError.between(index_dir, recorded, source, found["fingerprint"], found["dim"])


def _docs(request: Request) -> HTMLResponse:
    """The OpenAPI docs, their Swagger UI assets served from the package (an offline machine shows them)."""
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="medimageinsight-search API",
                               swagger_js_url=f"{root}/docs/static/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}/docs/static/swagger-ui.css",
                               swagger_favicon_url="data:,")


def _docs_asset(name: str) -> Response:
    if name not in SWAGGER_ASSETS:
        raise HTTPException(404, "not found")
    data = resources.files("retrieval.server").joinpath("static", "swagger-ui", name).read_bytes()
    return Response(data, media_type=SWAGGER_ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})


async def _as_one_line(request: Request, error: Exception) -> JSONResponse:
    return AsciiJSONResponse({"error": as_sent(request, one_line(error))}, status_code=400)


async def _invalid(_request: Request, error: Exception) -> JSONResponse:
    errors = error.errors() if isinstance(error, RequestValidationError) else []
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "form"))
    return AsciiJSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}".strip(": ")},
                             status_code=422)


async def _http_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    return AsciiJSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)
