"""What the page asks of the index besides searches: the values each filter can take with their counts (facets),
the folders and study years, the images that match a set of filters, an image's series and study. Read-only SQL
(plain SELECTs) over the served index, opened once per app; facets are cached per index generation."""
from __future__ import annotations

import os
import posixpath
import threading
from typing import Any

from sqlalchemy import text

from indexer.filters import FILTER_FIELDS, SearchFilters

MAX_FOLDERS = 300     # folders a facet lists (the shallowest first)
MAX_RELATED = 500     # images of one series or study the viewer's strip lists
_open_lock = threading.Lock()


def index_store(state: Any) -> Any:
    """The app's read-only IndexStore (its searcher's errors first: no index, an empty one)."""
    from indexer.store import IndexStore

    state.searcher()
    with _open_lock:
        store = getattr(state, "readonly_store", None)
        if store is None:
            store = state.readonly_store = IndexStore.open(state.index_dir, readonly=True)
    return store


def facets(state: Any) -> dict[str, Any]:
    """{"images", "generation", "filters": {name: [{value, count}]} for every equal-compared filter (with
    "(none)" counts), "folders": [{path, count, depth}], "years": [{year, count}], "dates": {first, last}}."""
    store = index_store(state)
    generation = store.generation()
    cached = getattr(state, "facets_cache", None)
    if cached and cached[0] == generation:
        return cached[1]
    images = store.count()
    found: dict[str, Any] = {}
    for field in FILTER_FIELDS:
        if field.compare == "equal":
            values = [{"value": value, "count": count} for value, count in store.values(field.column).items()]
            found[field.name] = {"values": values, "none": images - sum(v["count"] for v in values)}
    with store.engine.connect() as conn:
        years = conn.execute(text("SELECT substr(study_date, 1, 4), count(*) FROM images WHERE study_date IS NOT "
                                  "NULL GROUP BY 1 ORDER BY 1")).all()
        first, last = conn.execute(text("SELECT min(study_date), max(study_date) FROM images")).one()
        per_file = conn.execute(text("SELECT path, count(*) FROM images GROUP BY path")).all()
    answer = {"images": images, "generation": generation, "filters": found,
              "folders": folder_counts((os.fsdecode(path), count) for path, count in per_file),
              "years": [{"year": year, "count": count} for year, count in years],
              "dates": {"first": first, "last": last}}
    state.facets_cache = (generation, answer)
    return answer


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
