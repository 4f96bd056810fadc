"""The page's viewer API: an image's description for the viewer (size, its own windows, its series and study)
and PNG renderings of its original pixels at any window/level and size. Never the original bytes."""
from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ..hits import _jsonable
from . import aggregates
from .pixels import MAX_RENDER_SIZE, PixelCache, render_png
from .security import authorised

router = APIRouter(prefix="/api", dependencies=[Depends(authorised)])
_cache_lock = threading.Lock()  # one PixelCache per app, even when the first renders come at once


def _pixels(request: Request, image_id: int, size: int | None = None) -> tuple[dict[str, Any], Any]:
    state = request.app.state
    fields = state.searcher().image(image_id)
    with _cache_lock:
        cache = getattr(state, "pixel_cache", None)
        if cache is None:
            cache = state.pixel_cache = PixelCache()
    return fields, cache.get(fields, size)


@router.get("/images/{image_id}/view")
def view(request: Request, image_id: int) -> dict[str, Any]:
    """An image for the viewer: its stored fields, size, whether it can be windowed (grey), its own windows
    (WindowCenter/Width), the default window, the range of its values, and the ids of the other images of its
    series and study."""
    fields, pixels = _pixels(request, image_id)
    related = aggregates.related(request.app.state, fields)
    return {"fields": {key: _jsonable(value) for key, value in fields.items()}, **pixels.describe(),
            "series": related["series"], "study": related["study"]}


@router.get("/images/{image_id}/render", responses={200: {"content": {"image/png": {}}}})
def render(request: Request, image_id: int,
           wc: float | None = Query(None, description="window center (in modality units: HU for CT)"),
           ww: float | None = Query(None, ge=1, description="window width"),
           size: int | None = Query(None, ge=16, le=MAX_RENDER_SIZE,
                                    description="the longer side at most (pixels); full resolution if not given")
           ) -> Response:
    """A PNG of the image from its original pixels (the modality LUT applied) at window `wc`/`ww` (both, or
    neither for the file's own default), at most `size` pixels a side."""
    if (wc is None) != (ww is None):
        from ..errors import QueryError
        raise QueryError("give both wc and ww (a window center and width), or neither")
    _fields, pixels = _pixels(request, image_id, size)  # a drag's smaller copy is kept too: only the window is new
    png = render_png(pixels, wc, ww, size)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})
