"""`mi-serve`'s application: a warm search server over one index, with a web page.

The index and each model tower are loaded once and stay warm, so a query costs its encoding
and the vector search, not PyTorch's import and the weights' loading. Every search answers
from the newest committed generation (`Searcher` checks it), so `mi-index` can run meanwhile.

Safe by default: it binds to 127.0.0.1; another host needs a token (given, or generated and
printed), sent as `Authorization: Bearer TOKEN` (or `?token=` by the page). Images are served
by their id in the index, never by a path from a request; uploads are size-limited and decoded
with the indexer's guards. A bad request gets a 4xx with a one-line reason.

    app.py         create_app: the application and its state (the index, its warm Searcher, the token)
    routes.py      the page and the API, small functions over `request.app.state`
    models.py      the API's request models, derived from retrieval.request
    page.py        the page's filter controls, made from FILTER_FIELDS
    workspace.py   the page's facets, searches with paging (like/unlike ids) and exports
    aggregates.py  the read-only SQL behind them: facet counts, folders, years, series and study
    viewer.py      the viewer's API: an image's windows, series and study; renderings at any window/level
    pixels.py      the original pixels (modality LUT), their in-memory LRU, and window/level PNGs
    uploads.py     query images sent to the server: size-limited, in a private temporary folder
    thumbnails.py  the PNG thumbnails and their cache
    security.py    the token check, and what counts as loopback
"""
from .app import create_app
from .security import is_loopback
from .thumbnails import thumbnail_png

__all__ = ["create_app", "is_loopback", "thumbnail_png"]
