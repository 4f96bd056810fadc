"""The page's workspace API: facets (GET /api/facets), its searches with paging and a hit count (GET and POST
/api/results: text terms, liked and unliked images by id, an uploaded image), and exports of a selection as
CSV or JSON (POST /api/export), written by `mi export`'s code (retrieval.curate.export)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field, create_model

from indexer.filters import FILTER_FIELDS

from ..query import QueryTerm, combine, parse_query, typed_tokens
from ..request import MAX_K, MAX_TERMS, SearchRequest
from . import aggregates
from .models import PageSearch, options_of
from .security import authorised
from .uploads import save_upload

router = APIRouter(prefix="/api", dependencies=[Depends(authorised)])

# The page's search: PageSearch's filters and options, plus its query and where the page is in the results.
PageResults = create_model(
    "PageResults", __base__=PageSearch,
    q=(str | None, Field(None, description='Text terms, with + / - and weights as in mi-search ("2:effusion")')),
    like=(str | None, Field(None, description="Comma-separated ids of indexed images to search like")),
    unlike=(str | None, Field(None, description="Comma-separated ids of indexed images to search away from")),
    offset=(int, Field(0, ge=0, le=MAX_K, description="Hits to skip (paging: the page asks offset+k hits)")))


# GET /api/facets's parameters: the search's filters, by FILTER_FIELDS (names, help), read as a search reads them.
FacetFilters = create_model("FacetFilters", **{field.name: (str | None, Field(None, description=field.help))
                                               for field in FILTER_FIELDS})


@router.get("/facets")
def facets(request: Request, params: Annotated[FacetFilters, Query()]) -> dict[str, Any]:
    """The values each filter can take, with their image counts, each counted under the OTHER filters given
    (the search's: modality, body_part, view, since, until, under), so that a facet shows what choosing one of
    its values would give; the folders (a tree, each with the images under it), the study years and the first
    and last study date; `images` in the index and `matching` all the filters."""
    filters = SearchRequest.make(**params.model_dump()).filters  # the search's checks and its one-line errors
    return aggregates.facets(request.app.state, filters)


@router.get("/results")
def results(request: Request, params: Annotated[PageResults, Query()]) -> dict[str, Any]:
    """A search of the page: text terms (`q`), images to search like (`like`) or away from (`unlike`), each
    weighted as mi-search weighs its terms, with every filter; hits `offset` to `offset + k`, the query as it
    was understood and how many images the filters let through."""
    return _answer(request, params, None)


@router.post("/results")
async def results_upload(request: Request, params: Annotated[PageResults, Form()],
                         image: UploadFile = File(...)) -> dict[str, Any]:
    """As GET /api/results, with an uploaded image (PNG, JPEG, TIFF, BMP or DICOM, at most 64 MB) as one more
    term."""
    with tempfile.TemporaryDirectory(prefix="mi-serve-") as folder:
        path = await save_upload(image, Path(folder))
        return _answer(request, params, (path, image.filename or "uploaded image"))


def _answer(request: Request, params: BaseModel, upload: tuple[Path, str] | None) -> dict[str, Any]:
    current = request.app.state.searcher()
    given = options_of(params)
    q, like, unlike, offset = (given.pop(name) for name in ("q", "like", "unlike", "offset"))
    if offset + given["k"] > MAX_K:
        raise HTTPException(422, f"offset + k is at most {MAX_K}")
    texts = _text_terms(q)
    liked, unliked = _ids(like, "like"), _ids(unlike, "unlike")
    if len(texts) + len(liked) + len(unliked) + bool(upload) > MAX_TERMS:
        raise HTTPException(422, f"a query has at most {MAX_TERMS} terms")
    if not (texts or liked or unliked or upload):
        raise HTTPException(400, "give q (a text), an image upload, or like (image ids)")
    if not (texts or liked or upload):
        raise HTTPException(400, "unlike needs something to search like: a text, an image or liked images")
    asked = SearchRequest.make(**{**given, "k": offset + given["k"], "exclude_same": None})
    vectors, weights, shown = [], [], []
    for term in texts:  # one unit vector per term, as mi-search combines them (the Searcher caches texts)
        vectors.append(current.embed([QueryTerm("text", term.value)]))
        weights.append(term.weight)
        shown.append({"kind": "text", "text": term.value, "weight": term.weight})
    for ids, sign, kind in ((liked, 1.0, "like"), (unliked, -1.0, "unlike")):
        for image_id in ids:
            vectors.append(current.vector_of(image_id))
            weights.append(sign)
            shown.append({"kind": kind, "id": image_id, "weight": sign})
    if upload:
        vectors.append(current.embed(image=str(upload[0])))
        weights.append(1.0)
        shown.append({"kind": "image", "name": upload[1], "weight": 1.0})
    vector = vectors[0] if len(vectors) == 1 else combine(np.stack(vectors), weights)
    hits = current.answer(asked, vector)
    return {"hits": [hit.to_dict() for hit in hits[offset:]], "offset": offset, "k": given["k"],
            "more": len(hits) == offset + given["k"], "query": shown,
            "matching": aggregates.matching(request.app.state, asked.filters)}


def _text_terms(q: str | None) -> list[QueryTerm]:
    if not (q and q.strip()):
        return []
    # Every term is text: a term naming a file on the server must never be read as an image.
    return parse_query(typed_tokens(q), force="text")


def _ids(value: str | None, name: str) -> list[int]:
    try:
        return list(dict.fromkeys(int(part) for part in (value or "").split(",") if part.strip()))
    except ValueError:
        raise HTTPException(422, f"{name}: comma-separated image ids, not {value!r}") from None


class ExportIn(BaseModel):
    """The images to export, in order, with their scores where they come from a search."""

    ids: list[int] = Field(min_length=1, max_length=MAX_K)
    scores: list[float | None] | None = Field(None, max_length=MAX_K)
    format: Literal["csv", "json"] = "csv"
    group: str | None = Field(None, max_length=200, description="what the export is (a query, a cluster)")


@router.post("/export", responses={200: {"content": {"text/csv": {}, "application/json": {}}}})
def export(request: Request, body: ExportIn) -> Response:
    """The rows of `mi export` (id, path, frame, score, UIDs, modality, ...) of the given images, as a CSV or
    JSON download."""
    from ..curate import export as exporting

    scores = body.scores or [None] * len(body.ids)
    if len(scores) != len(body.ids):
        raise HTTPException(422, "scores: one per id")
    rows = exporting.rows_of(aggregates.index_store(request.app.state),
                             [(i, s, body.group) for i, s in zip(body.ids, scores)])
    if body.format == "json":
        return Response(exporting.dumps(rows) + "\n", media_type="application/json",
                        headers={"Content-Disposition": 'attachment; filename="mi-export.json"'})
    return Response(exporting.csv_text(rows), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="mi-export.csv"'})
