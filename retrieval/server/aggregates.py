"""What the page asks of the index besides searches: the values each filter can take with their counts (facets),
the folders and study years, each counted under the other filters, the images that match a set of filters, an
image's series and study. Read-only SQL (plain SELECTs, GROUP BY: no loop over rows) over the served index,
opened once per app; facets are cached per index generation and filters."""
from __future__ import annotations

import dataclasses
import os
import posixpath
import threading
from collections import OrderedDict
from typing import Any

from sqlalchemy import text

from indexer.filters import FILTER_FIELDS, SearchFilters

MAX_FOLDERS = 300     # folders a facet lists (the shallowest first)
MAX_RELATED = 500     # images of one series or study the viewer's strip lists
FACETS_CACHED = 32    # facet answers kept (per index generation and filters): the page's recent choices
_open_lock = threading.Lock()
_facets_lock = threading.Lock()


def index_store(state: Any) -> Any:
    """The app's read-only IndexStore (its searcher's errors first: no index, an empty one)."""
    from indexer.store import IndexStore

    state.searcher()
    with _open_lock:
        store = getattr(state, "readonly_store", None)
        if store is None:
            store = state.readonly_store = IndexStore.open(state.index_dir, readonly=True)
    return store


def facets(state: Any, filters: SearchFilters | None = None) -> dict[str, Any]:
    """{"images", "matching", "generation", "filters": {name: {"values": [{value, count}], "none"}} for every
    equal-compared filter, "folders": [{path, count, depth}], "years": [{year, count}], "dates": {first, last}}.

    Each facet counts the images that the OTHER filters let through, as FiftyOne's sidebar does: with modality
    CT chosen the body parts are CT's, while the modality facet still counts every modality under the rest (so
    that one can switch); the date facet (years, dates) ignores since/until, the folders ignore under.
    `images` is the whole index, `matching` what all the filters let through. Cached per (index generation,
    filters), the last FACETS_CACHED of them."""
    store = index_store(state)
    filters = filters or SearchFilters()
    key = (store.generation(), filters)
    with _facets_lock:
        cache = getattr(state, "facets_cache", None)
        if not isinstance(cache, OrderedDict):
            cache = state.facets_cache = OrderedDict()
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    answer = _facets(store, key[0], filters)
    with _facets_lock:
        cache[key] = answer
        while len(cache) > FACETS_CACHED:
            cache.popitem(last=False)
    return answer


def _without(filters: SearchFilters, compares: tuple[str, ...]) -> SearchFilters:
    """The filters less those that compare as `compares` (the facet's own), by FILTER_FIELDS."""
    return dataclasses.replace(filters, **{f.name: None for f in FILTER_FIELDS if f.compare in compares})


def _facets(store: Any, generation: int, filters: SearchFilters) -> dict[str, Any]:
    from indexer.store.reads import filter_clause

    found: dict[str, Any] = {}
    with store.engine.connect() as conn:
        def rows(select: str, group: str, ignoring: SearchFilters) -> list[Any]:
            where, params = filter_clause(ignoring)
            return conn.execute(text(f"SELECT {select}, count(*) FROM images WHERE {where} GROUP BY {group}"),
                                params).all()

        matching = None
        for field in FILTER_FIELDS:
            if field.compare == "equal":
                # one scan, its NULL group the images with no value recorded. Alone, grouped as the filter
                # compares (NOCASE), so that an index on the column is walked in order (no sort); under other
                # filters by upper(): walking that index, SQLite would fetch every row to test them
                others = dataclasses.replace(filters, **{field.name: None})
                group = f"upper({field.column})" if others else f"{field.column} COLLATE NOCASE"
                counted = rows(f"upper({field.column})", f"{group} ORDER BY 2 DESC, 1", others)
                found[field.name] = {"values": [{"value": v, "count": n} for v, n in counted if v is not None],
                                     "none": sum(n for v, n in counted if v is None)}
                if matching is None:  # what all the filters let through, read off this facet: no scan of its own
                    chosen = getattr(filters, field.name)
                    matching = sum(n for v, n in counted if chosen is None or v == chosen.upper())
        # by day, which the index on study_date gives in order; the years are summed from the days
        days = rows("study_date", "study_date", _without(filters, ("from", "to")))
        years: dict[str, int] = {}
        for day, count in days:
            if day is not None:
                years[day[:4]] = years.get(day[:4], 0) + count
        dated = [day for day, _count in days if day is not None]
        # each path's folder with its trailing "/" (folder_counts reads it as the path of a file there), text
        # or BLOB (a name that is not UTF-8); SQLite's rtrim(path, replace(path, '/', '')) took twice as long
        conn.connection.driver_connection.create_function("mi_folder_of", 1, _folder_of, deterministic=True)
        per_folder = rows("mi_folder_of(path)", "1", _without(filters, ("under",)))
        images = conn.execute(text("SELECT count(*) FROM images")).scalar()
    return {"images": images, "matching": matching, "generation": generation, "filters": found,
            "folders": folder_counts((os.fsdecode(folder), count) for folder, count in per_folder),
            "years": [{"year": year, "count": count} for year, count in sorted(years.items())],
            "dates": {"first": min(dated, default=None), "last": max(dated, default=None)}}


def _folder_of(path: str | bytes) -> str | bytes:
    return path[:path.rfind("/" if isinstance(path, str) else b"/") + 1]


def folder_counts(per_file: Any) -> list[dict[str, Any]]:
    """[{path, count, depth}] of the folders holding the files, each with the images under it, from the files'
    common folder down (depth 0), the shallowest MAX_FOLDERS in tree order. PACS keys group by their service."""
    counts: dict[str, int] = {}
    for path, count in per_file:
        folder = posixpath.dirname(path.split("/studies/")[0] if "://" in path else path)
        while True:
            counts[folder] = counts.get(folder, 0) + count
            parent = posixpath.dirname(folder)
            if parent == folder or "://" in folder and parent.endswith(":"):
                break
            folder = parent
    if not counts:
        return []
    total = max(counts.values())
    # the deepest folder that holds every image: where the tree starts
    roots = [folder for folder, count in counts.items() if count == total]
    root = max(roots, key=len)
    below = [folder for folder in counts if folder == root or folder.startswith(root.rstrip("/") + "/")]
    depth = {folder: 0 if folder == root else folder[len(root.rstrip("/")):].count("/") for folder in below}
    kept = sorted(below, key=lambda folder: (depth[folder], folder))[:MAX_FOLDERS]
    return [{"path": folder, "count": counts[folder], "depth": depth[folder]} for folder in sorted(kept)]


def matching(state: Any, filters: SearchFilters) -> int:
    """How many images the filters let through (all of them when none is set)."""
    store = index_store(state)
    allowed = store.filter_ids(filters)
    return store.count() if allowed is None else len(allowed)


def related(state: Any, fields: dict[str, Any]) -> dict[str, list[int]]:
    """{"series": ids, "study": ids}: the images of the image's series and of the rest of its study, in file and
    frame order (at most MAX_RELATED each)."""
    store = index_store(state)
    out: dict[str, list[int]] = {"series": [], "study": []}
    with store.engine.connect() as conn:
        if fields.get("series_instance_uid"):
            out["series"] = list(conn.execute(text(
                "SELECT id FROM images WHERE series_instance_uid = :s ORDER BY path, frame LIMIT :n"),
                {"s": fields["series_instance_uid"], "n": MAX_RELATED}).scalars())
        if fields.get("study_instance_uid"):
            out["study"] = list(conn.execute(text(
                "SELECT id FROM images WHERE study_instance_uid = :s AND series_instance_uid IS NOT :series "
                "ORDER BY series_instance_uid, path, frame LIMIT :n"),
                {"s": fields["study_instance_uid"], "series": fields.get("series_instance_uid"),
                 "n": MAX_RELATED}).scalars())
    return out
