"""The server's page and API: small functions over `request.app.state` (index_dir, searcher, token)."""
from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, Response

from indexer.errors import MIError, one_line

from ..hits import _jsonable
from ..query import typed_tokens
from ..request import SearchRequest
from .json_response import AsciiJSONResponse
from .models import PageSearch, QueryIn, options_of
from .page import page_html
from .security import authorised
from .uploads import query_terms, save_upload, sent_names

router = APIRouter()
api = APIRouter(prefix="/api", dependencies=[Depends(authorised)])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    """The web page, its filter controls made from indexer.filters' FILTER_FIELDS (retrieval.server.page)."""
    return page_html()


@api.get("/health")
def health(request: Request) -> dict[str, Any]:
    """Whether the index can be searched, and what it holds: images, model, generation,
    when it was last indexed, images per modality, files skipped."""
    index_dir = str(request.app.state.index_dir)
    try:
        current = request.app.state.searcher()
    except MIError as error:
        return {"ready": False, "index": index_dir, "reason": one_line(error)}
    stats = current.stats()
    return {"ready": True, "index": index_dir, "images": stats["images"], "model": current.model_info,
            "generation": stats["generation"], "last_indexed": stats["last_run_at"],
            "modalities": stats["modalities"], "skipped_files": sum(stats["skipped"].values())}


@api.get("/search", response_model=list[dict[str, Any]])
def search_get(request: Request, params: Annotated[PageSearch, Query()], q: str | None = None,
               like: int | None = None) -> Response:
    """A text query (`q`, with `+`/`-` terms as in mi-search) or "more like this" (`like`:
    an image id), with every filter and option of mi-search."""
    current = request.app.state.searcher()
    if like is not None:
        asked = SearchRequest.make(**{**options_of(params), "exclude_same": None})
        return _hits_response(current.answer(asked, current.vector_of(like)))
    if not (q and q.strip()):
        raise HTTPException(400, "give q (a text), an image upload, or like (an image id)")
    # Every term is text: a term naming a file on the server must never be read as an image.
    terms = typed_tokens(q)
    return _hits_response(current.search(terms, force="text", **options_of(params)))


def _hits_response(hits) -> Response:
    """The hits as the app's JSON, made here: returned as a value, FastAPI checked every dict against
    the declared model again, in another hop through the thread pool (a third of the server's own time)."""
    return AsciiJSONResponse([hit.to_dict() for hit in hits])


@api.post("/search")
async def search_upload(request: Request, params: Annotated[PageSearch, Form()],
                        image: UploadFile = File(...)) -> list[dict[str, Any]]:
    """An image query: a PNG, JPEG, TIFF, BMP or DICOM file uploaded (at most 64 MB)."""
    current = request.app.state.searcher()
    request.state.under_given = params.under
    with tempfile.TemporaryDirectory(prefix="mi-serve-") as folder:
        path = await save_upload(image, Path(folder), sent_names(request))
        return [hit.to_dict() for hit in current.search(image=str(path), **options_of(params))]


@api.post("/query")
def query(request: Request, body: QueryIn, x_mi_index: str | None = Header(None)) -> Response:
    """The search of `mi-search` QUERY... [options]: parsed terms (image files sent as bytes)
    and every option. Hits carry full-precision scores, so the client prints exactly what a
    local search prints."""
    index_dir = request.app.state.index_dir
    if x_mi_index is not None and os.fsencode(index_dir) != urllib.parse.unquote_to_bytes(x_mi_index):
        raise HTTPException(421, f"this server serves {index_dir}, not the index asked for")
    current = request.app.state.searcher()
    with tempfile.TemporaryDirectory(prefix="mi-serve-") as folder:
        request.state.under_given = body.under
        asked = SearchRequest.make(query_terms(body.terms, Path(folder), sent_names(request)), **options_of(body))
        hits = current.answer(asked)
    rows = [{**hit.to_dict(), "score": float(hit.score)} for hit in hits]
    # ASCII JSON: a file name that is not UTF-8 travels as its surrogate escapes, losslessly.
    return Response(json.dumps({"hits": rows}, default=str), media_type="application/json")


@api.get("/images/{image_id}")
def image_fields(request: Request, image_id: int) -> dict[str, Any]:
    """The stored fields of one indexed image."""
    return {key: _jsonable(value) for key, value in request.app.state.searcher().image(image_id).items()}


@api.get("/images/{image_id}/labels")
def image_labels(request: Request, image_id: int, labels: str, multilabel: bool = False) -> dict[str, float]:
    """Zero-shot probabilities of comma-separated `labels` for one indexed image: a softmax
    over them, or one independent probability each with `multilabel`."""
    return request.app.state.searcher().classify(image_id, labels, multilabel=multilabel)


@api.get("/images/{image_id}/thumbnail", responses={200: {"content": {"image/png": {}}}})
async def thumbnail(request: Request, image_id: int) -> Response:
    """A PNG of the image (DICOM rendered with the indexing windowing), at most 256 pixels a
    side, cached beside the index. Never the original bytes. 503 (Retry-After) when too many are asked at once."""
    png = await request.app.state.thumbnails.png(request.app.state.searcher, image_id)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


router.include_router(api)
