"""`mi-serve`: a warm search server over one index, with a web page.

The index and each model tower are loaded once and stay warm, so a query costs its encoding
and the vector search, not PyTorch's import and the weights' loading. Every search answers
from the newest committed generation (`Searcher` checks it), so `mi-index` can run meanwhile.

Safe by default: it binds to 127.0.0.1; another host needs a token (given, or generated and
printed), sent as `Authorization: Bearer TOKEN` (or `?token=` by the page). Images are served
by their id in the index, never by a path from a request; uploads are size-limited and decoded
with the indexer's guards. A bad request gets a 4xx with a one-line reason.
"""
import hmac
import io
import ipaddress
import os
import tempfile
import threading
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any

import base64
import binascii
import json
from typing import Literal

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

MAX_UPLOAD_BYTES = 64 << 20
THUMBNAIL_SIZE = 256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")


class TermIn(BaseModel):
    """One parsed query term, as `mi-search` sends it: a text, or an image file's bytes (read
    by the client: the server never opens a path it is sent)."""

    kind: Literal["text", "image"]
    text: str | None = None
    data: str | None = Field(None, description="the image file, base64")
    name: str = Field("", description="the image file's name (its suffix helps decoding)")
    weight: float = 1.0


class QueryIn(BaseModel):
    """A search as `mi-search` asks it: terms plus every option of the command."""

    terms: list[TermIn] = Field(min_length=1, max_length=64)
    k: int = Field(10, ge=1, le=10000)
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    since: str | None = None
    until: str | None = None
    under: str | None = Field(None, description="a resolved folder on the server's machine")
    min_score: float | None = None
    labels: str | None = None
    multilabel: bool = False
    group: Literal["study", "patient"] | None = None
    duplicates: bool = False
    exclude_same: Literal["study", "patient"] | None = None


def create_app(index_dir: str | os.PathLike, *, model: Any = None, device: str | None = None,
               token: str | None = None) -> FastAPI:
    """The FastAPI application serving `index_dir`. `model`: as `Searcher`'s (a folder, a hub
    id, a loaded encoder, or None for the index's); `token`: required on every API call if set."""
    from indexer.errors import MIError, one_line
    from indexer.filters import SearchFilters

    from .search import Searcher

    index_dir = Path(index_dir).expanduser().resolve()
    state: dict[str, Any] = {"searcher": None}
    lock = threading.Lock()
    app = FastAPI(title="medimageinsight-search", description="Search an index of X-rays and DICOM files by "
                  "text or by example image.", version="1")

    def searcher() -> Searcher:
        with lock:  # opened on first need, and again once an empty or missing index has images
            if state["searcher"] is None:
                state["searcher"] = Searcher(index_dir, model=model, device=device)
            return state["searcher"]

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
            or request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a token is required: Authorization: Bearer TOKEN")

    @app.exception_handler(MIError)
    async def as_one_line(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": one_line(error)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query"))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}".strip(": ")},
                            status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("retrieval").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/api/health", dependencies=[Depends(authorised)])
    def health() -> dict[str, Any]:
        """Whether the index can be searched, and what it holds: images, model, generation,
        when it was last indexed, images per modality, files skipped."""
        try:
            current = searcher()
        except MIError as error:
            return {"ready": False, "index": str(index_dir), "reason": one_line(error)}
        stats = current.stats()
        return {"ready": True, "index": str(index_dir), "images": stats["images"], "model": current.model_info,
                "generation": stats["generation"], "last_indexed": stats["last_run_at"],
                "modalities": stats["modalities"], "skipped_files": sum(stats["skipped"].values())}

    def run_search(q: str | None, image_path: str | None, like: int | None, k: int, modality: str | None,
                   body_part: str | None, view: str | None, since: str | None, until: str | None,
                   under: str | None, min_score: float | None, labels: str | None, group: str | None,
                   duplicates: bool, exclude_same: str | None) -> list[dict[str, Any]]:
        current = searcher()
        filters = SearchFilters.make(modality=modality, body_part=body_part, view=view, since=since, until=until,
                                     under=under)
        options = dict(k=min(max(k, 1), 1000), filters=filters, min_score=min_score, labels=labels or None,
                       group=group or None, duplicates=duplicates, exclude_same=exclude_same or None)
        if like is not None:
            hits = current.search(vector=current.vector_of(like), **{**options, "exclude_same": None})
        elif image_path is not None:
            hits = current.search(image=image_path, **options)
        elif q and q.strip():
            # Every term is text: a term naming a file on the server must never be read as an image.
            terms = q.split() if any(t in ("+", "-") for t in q.split()) else q
            hits = current.search(terms, force="text", **options)
        else:
            raise HTTPException(400, "give q (a text), an image upload, or like (an image id)")
        return [hit.to_dict() for hit in hits]

    @app.get("/api/search", dependencies=[Depends(authorised)])
    def search_get(q: str | None = None, like: int | None = None, k: int = 24, modality: str | None = None,
                   body_part: str | None = None, view: str | None = None, since: str | None = None,
                   until: str | None = None, under: str | None = None, min_score: float | None = None,
                   labels: str | None = None, group: str | None = Query(None, pattern="^(study|patient)$"),
                   duplicates: bool = False) -> list[dict[str, Any]]:
        """A text query (`q`, with `+`/`-` terms as in mi-search) or "more like this" (`like`:
        an image id), with every filter of mi-search."""
        return run_search(q, None, like, k, modality, body_part, view, since, until, under, min_score, labels,
                          group, duplicates, None)

    @app.post("/api/search", dependencies=[Depends(authorised)])
    async def search_upload(image: UploadFile = File(...), k: int = Form(24), modality: str | None = Form(None),
                            body_part: str | None = Form(None), view: str | None = Form(None),
                            since: str | None = Form(None), until: str | None = Form(None),
                            under: str | None = Form(None), min_score: float | None = Form(None),
                            labels: str | None = Form(None), group: str | None = Form(None),
                            duplicates: bool = Form(False), exclude_same: str | None = Form(None)
                            ) -> list[dict[str, Any]]:
        """An image query: a PNG, JPEG, TIFF, BMP or DICOM file uploaded (at most 64 MB)."""
        data = await image.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"the upload is over {MAX_UPLOAD_BYTES >> 20} MB")
        with tempfile.TemporaryDirectory(prefix="mi-serve-") as folder:
            path = Path(folder) / f"query{_suffix(image.filename)}"
            path.write_bytes(data)
            return run_search(None, str(path), None, k, modality, body_part, view, since, until, under, min_score,
                              labels, group, duplicates, exclude_same)

    @app.post("/api/query", dependencies=[Depends(authorised)])
    def query(request: QueryIn, x_mi_index: str | None = Header(None)) -> Response:
        """The search of `mi-search` QUERY... [options]: parsed terms (image files sent as bytes)
        and every option. Hits carry full-precision scores, so the client prints exactly what a
        local search prints."""
        from .query import QueryTerm

        if x_mi_index is not None and os.fsencode(index_dir) != urllib.parse.unquote_to_bytes(x_mi_index):
            raise HTTPException(421, f"this server serves {index_dir}, not the index asked for")
        current = searcher()
        filters = SearchFilters.make(modality=request.modality, body_part=request.body_part, view=request.view,
                                     since=request.since, until=request.until, under=request.under)
        with tempfile.TemporaryDirectory(prefix="mi-serve-") as folder:
            terms, room = [], MAX_UPLOAD_BYTES
            for number, term in enumerate(request.terms):
                if term.kind == "text":
                    if not (term.text or "").strip():
                        raise HTTPException(422, f"term {number + 1}: a text term needs its text")
                    terms.append(QueryTerm("text", term.text, term.weight))
                    continue
                data = _base64(term.data, number)
                room -= len(data)
                if room < 0:
                    raise HTTPException(413, f"the query images are over {MAX_UPLOAD_BYTES >> 20} MB")
                path = Path(folder) / f"term{number}{_suffix(term.name)}"
                path.write_bytes(data)
                terms.append(QueryTerm("image", str(path), term.weight))
            hits = current.search(terms, k=request.k, filters=filters, min_score=request.min_score,
                                  labels=request.labels, multilabel=request.multilabel, group=request.group,
                                  duplicates=request.duplicates, exclude_same=request.exclude_same)
        rows = [{**hit.to_dict(), "score": float(hit.score)} for hit in hits]
        # ASCII JSON: a file name that is not UTF-8 travels as its surrogate escapes, losslessly.
        return Response(json.dumps({"hits": rows}, default=str), media_type="application/json")

    @app.get("/api/images/{image_id}", dependencies=[Depends(authorised)])
    def image_fields(image_id: int) -> dict[str, Any]:
        """The stored fields of one indexed image."""
        from .hits import _jsonable
        return {key: _jsonable(value) for key, value in searcher().image(image_id).items()}

    @app.get("/api/images/{image_id}/labels", dependencies=[Depends(authorised)])
    def image_labels(image_id: int, labels: str, multilabel: bool = False) -> dict[str, float]:
        """Zero-shot probabilities of comma-separated `labels` for one indexed image: a softmax
        over them, or one independent probability each with `multilabel`."""
        return searcher().classify(image_id, labels, multilabel=multilabel)

    @app.get("/api/images/{image_id}/thumbnail", dependencies=[Depends(authorised)],
             responses={200: {"content": {"image/png": {}}}})
    def thumbnail(image_id: int) -> Response:
        """A PNG of the image (DICOM rendered with the indexing windowing), at most 256 pixels a
        side, cached beside the index. Never the original bytes."""
        return Response(thumbnail_png(searcher(), index_dir, image_id), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    return app


def _suffix(name: str | None) -> str:
    """The suffix of an uploaded file's name when it is one we decode, else none (sniffed)."""
    suffix = Path(name or "").suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES else ""


def _base64(data: str | None, number: int) -> bytes:
    if not data:
        raise HTTPException(422, f"term {number + 1}: an image term needs its data")
    if len(data) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise HTTPException(413, f"the query images are over {MAX_UPLOAD_BYTES >> 20} MB")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"term {number + 1}: the image data is not base64") from None


def thumbnail_png(searcher: Any, index_dir: Path, image_id: int) -> bytes:
    """The thumbnail of an indexed image, from the cache folder or rendered once."""
    from PIL import Image

    from indexer.decode import DecodeError, decode_bytes, decode_file
    from indexer.errors import MIError
    from indexer.pacs_keys import is_dicomweb_url, is_dimse_url

    from .errors import QueryError

    fields = searcher.image(image_id)
    cached = index_dir / "thumbnails" / f"{image_id}.png"
    if cached.exists():
        return cached.read_bytes()
    frames = "all" if fields.get("frame") else "middle"
    try:
        if is_dicomweb_url(fields["path"]) or is_dimse_url(fields["path"]):
            # indexed from a PACS: retrieved from it (MI_DICOMWEB_* login, MI_DIMSE_AET)
            if is_dicomweb_url(fields["path"]):
                from indexer.sources.dicomweb import read_instance
            else:
                from indexer.sources.dimse import read_instance
            decoded = decode_bytes(read_instance(fields["path"]), Path("instance.dcm"), frames=frames, kind="dicom")
        else:
            decoded = decode_file(fields["path"], frames=frames)
    except (DecodeError, MIError, OSError) as error:
        raise QueryError(f"cannot render image {image_id}: {error}") from None
    frames = dict(decoded.frames)
    picture = frames.get(fields.get("frame") or 0) or decoded.frames[0][1]
    picture = picture.copy()
    picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    try:  # a cache only: a read-only index still serves thumbnails
        cached.parent.mkdir(exist_ok=True)
        temporary = cached.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_bytes(buffer.getvalue())
        os.replace(temporary, cached)
    except OSError:
        pass
    return buffer.getvalue()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
