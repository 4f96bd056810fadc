"""The dataset checks as API routes: GET /api/duplicates, /api/leakage and /api/outliers answer the JSON of
`mi duplicates / leakage / outliers --json` (retrieval.curate's functions, computed in a worker thread, one
check at a time, cached per index generation and parameters), and GET /api/map, /api/map/points and
/api/map/colours serve the stored map (`mi map`) as compact binary arrays for the page."""
from __future__ import annotations

import base64
import gc
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from indexer.errors import one_line

from ..curate.duplicates import DEFAULT_THRESHOLD
from ..curate.neighbours import DEFAULT_K
from ..curate.outliers import GROUPINGS
from . import aggregates
from .security import authorised

router = APIRouter(prefix="/api", dependencies=[Depends(authorised)])

MAX_CLUSTERS = 5000      # duplicate clusters one answer lists (the summary counts them all)
MAX_OUTLIERS = 1000
MAX_K = 100              # neighbours compared per image
MAX_SPLITS = 32
CACHED_REPORTS = 8       # reports kept (per generation and parameters); a big index's can be megabytes
MAX_PENDING = 4          # distinct checks computing or waiting at once; more: 503 (each can take minutes)
MAX_CODES = 1 << 16      # /api/map/colours' uint16 codes: the most frequent 65535 values, the rest share the last
MAP_FIELDS = ("modality", "body_part", "view", "folder")
_state_lock = threading.Lock()


class CheckParams(BaseModel):
    """Query parameters of a check: unknown ones are refused (a typo must not silently give the default)."""

    model_config = ConfigDict(extra="forbid")
    token: str | None = Field(None, description="the server's token, when it is not sent as a header")


class DuplicatesParams(CheckParams):
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1.0, description="near duplicates: cosine at or above")
    near: bool = Field(True, description="false: exact duplicates only (no vectors compared)")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="neighbours compared per image")
    limit: int = Field(200, ge=0, le=MAX_CLUSTERS, description="clusters listed, largest first")


class LeakageParams(CheckParams):
    by: str | None = Field(None, max_length=100, description="a stored field whose values are the splits")
    split: list[str] = Field([], max_length=MAX_SPLITS,
                             description="NAME=FOLDER, twice or more: the images the index stores under FOLDER")
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1.0, description="near duplicates: cosine at or above")
    near: bool = Field(True, description="false: skip near duplicates (no vectors compared)")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="neighbours compared per image")


class OutliersParams(CheckParams):
    by: Literal["folder", "modality", "body_part", "view"] | None = Field(None, description="judge images by group")
    top: int = Field(50, ge=1, le=MAX_OUTLIERS, description="outliers listed")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="neighbours per image")


class ColoursParams(CheckParams):
    by: Literal["modality", "body_part", "view", "folder"] = Field(description="the field the points are coloured by")


@router.get("/duplicates")
def duplicates(request: Request, params: Annotated[DuplicatesParams, Query()]) -> dict[str, Any]:
    """The report of `mi duplicates --json` (clusters, largest first, at most `limit`; the summary counts all;
    the nearest-neighbour similarity distribution)."""
    from ..curate.duplicates import find_duplicates

    report = _cached(request, ("duplicates", params.threshold if params.near else None, params.near, params.k),
                     lambda reader: find_duplicates(reader, threshold=params.threshold, k=params.k, near=params.near))
    return {**report, "clusters": report["clusters"][:params.limit]}


@router.get("/leakage")
def leakage(request: Request, params: Annotated[LeakageParams, Query()]) -> dict[str, Any]:
    """The report of `mi leakage --json`: splits by a stored field (`by`) or as folders (`split=NAME=FOLDER`,
    twice or more, matched against the paths the index stores: the server never opens a path it is sent)."""
    from ..curate import splits as split_sources
    from ..curate.leakage import find_leakage

    if bool(params.by) == bool(params.split):
        raise HTTPException(422, "give the splits one way: by=FIELD, or split=NAME=FOLDER twice or more")
    if params.split and len(params.split) < 2:
        raise HTTPException(422, "split: give two or more (split=train=/data/train&split=test=/data/test)")
    folders = [_stored_folder(value) for value in params.split]
    threshold = params.threshold if params.near else None

    def compute(reader: Any) -> dict[str, Any]:
        try:
            splits = (split_sources.from_stored_folders(reader, folders) if folders
                      else split_sources.from_field(reader, params.by))
        except split_sources.SplitError as error:
            raise HTTPException(422, one_line(error).replace("--split-by", "by")) from None
        return find_leakage(reader, splits, threshold=threshold, k=params.k)

    return _cached(request, ("leakage", params.by, tuple(folders), threshold, params.k), compute)


def _stored_folder(value: str) -> tuple[str, str]:
    """"NAME=FOLDER" -> (name, FOLDER normalised as the index stores paths: absolute, no `..`), the file
    system never asked (no resolving, no `~`)."""
    from ..curate.splits import SplitError, parse_split_option

    try:
        name, _ = parse_split_option(value)
    except SplitError:
        raise HTTPException(422, f"split takes NAME=FOLDER (split=train=/data/train), not {value!r}") from None
    folder = value.partition("=")[2].strip()
    if not folder.startswith("/"):
        raise HTTPException(422, f"split: FOLDER is a path as the index stores it, from /, not {folder!r}")
    return name, os.path.normpath(folder)


@router.get("/outliers")
def outliers(request: Request, params: Annotated[OutliersParams, Query()]) -> dict[str, Any]:
    """The report of `mi outliers --json`: the `top` most unusual images, each with its score, reason and
    nearest neighbours."""
    from ..curate.outliers import find_outliers

    return _cached(request, ("outliers", params.by, params.top, params.k),
                   lambda reader: find_outliers(reader, by=params.by, k=params.k, top=params.top))


# ------------------------------------------------------------------ computing and caching the reports
class ReportCache:
    """The recent reports by (generation, parameters), each computed once however many ask at the same time,
    one check at a time (each reads every vector), with at most MAX_PENDING distinct checks in the queue."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.computing = threading.Lock()
        self.reports: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self.pending: dict[tuple, Future] = {}

    def get(self, key: tuple, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        with self.lock:
            if key in self.reports:
                self.reports.move_to_end(key)
                return self.reports[key]
            future = self.pending.get(key)
            owner = future is None
            if owner:
                if len(self.pending) >= MAX_PENDING:
                    raise HTTPException(503, "the server is busy with other checks: ask again in a while")
                future = self.pending[key] = Future()
        if not owner:
            return future.result()
        try:
            with self.computing:
                report = compute()
            with self.lock:
                self.reports[(report.get("generation", key[0]), *key[1:])] = report
                while len(self.reports) > CACHED_REPORTS:
                    self.reports.popitem(last=False)
            future.set_result(report)
            return report
        except BaseException as error:
            future.set_exception(error)
            raise
        finally:
            with self.lock:
                self.pending.pop(key, None)


def _shared(state: Any, name: str, make: Callable[[], Any]) -> Any:
    with _state_lock:
        found = getattr(state, name, None)
        if found is None:
            found = make()
            setattr(state, name, found)
        return found


def _cached(request: Request, parameters: tuple, run: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """`run(reader)`'s report over the served index, from the cache when this generation and these parameters
    were asked before; as the CLI's --json writes it (json.dumps(default=str)), NaN as null."""
    from ..curate.reader import IndexReader

    state = request.app.state
    generation = aggregates.index_store(state).generation()  # the searcher's errors first: no index, empty

    def compute() -> dict[str, Any]:
        with IndexReader(state.index_dir) as reader:
            report = run(reader)
        return json.loads(json.dumps(report, default=str), parse_constant=lambda _constant: None)

    return _shared(state, "check_reports", ReportCache).get((generation, *parameters), compute)


# ------------------------------------------------------------------ the map
class MapView:
    """The stored map's points that the index still holds, in id order; made once per (map file, index
    generation)."""

    def __init__(self, key: tuple, generation: int, index_generation: int, method: str | None, ids: np.ndarray,
                 xy: np.ndarray) -> None:
        self.key, self.generation, self.index_generation, self.method = key, generation, index_generation, method
        self.ids, self.xy = ids, xy
        self.points = ids.astype("<i4").tobytes() + xy.astype("<f4").tobytes()
        self.colours: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()


def _map_view(request: Request) -> MapView:
    from ..curate.imagemap import MapError, load_map, map_files

    state = request.app.state
    store = aggregates.index_store(state)
    index_generation = store.generation()
    files = map_files(state.index_dir)
    if not files:
        raise HTTPException(404, "no map yet: run mi map")
    map_generation, path = files[-1]
    try:
        stat = path.stat()
    except FileNotFoundError:  # replaced by a newer one since it was listed
        raise HTTPException(503, "mi map is writing a new map: ask again") from None
    key = (path.name, stat.st_size, stat.st_mtime_ns, index_generation)
    with _state_lock:
        view = getattr(state, "map_view", None)
    if view is not None and view.key == key:
        return view
    try:
        ids, xy = load_map(state.index_dir)
        with np.load(path, allow_pickle=False) as data:
            method = str(data["method"]) if "method" in data.files else None
    except (MapError, OSError, ValueError, KeyError) as error:
        raise HTTPException(404, f"no map yet: run mi map ({one_line(error)})") from None
    xy = np.asarray(xy, np.float32)
    if map_generation != index_generation:  # images removed since: drop their points (new ones wait for mi map)
        held = _positions(_columns(store, ())[0], ids) >= 0
        ids, xy = ids[held], xy[held]
    view = MapView(key, map_generation, index_generation, method, ids, xy)
    with _state_lock:
        state.map_view = view
    return view


def _positions(index_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Where each of `ids` sits in the ascending `index_ids`, -1 where it is not there."""
    if not len(index_ids):
        return np.full(len(ids), -1, np.int64)
    at = np.minimum(np.searchsorted(index_ids, ids), len(index_ids) - 1)
    return np.where(index_ids[at] == ids, at, -1)


def _columns(store: Any, columns: tuple[str, ...]) -> tuple[np.ndarray, list[tuple]]:
    """(ids ascending, each column's values in that order) through the raw sqlite3 connection: no per-row
    SQLAlchemy objects, and no ORDER BY, so SQLite may scan a small covering index instead of the rows (each
    holds its vector); numpy sorts."""
    collecting = gc.isenabled()
    connection = store.engine.raw_connection()
    try:
        # 100k row tuples would set the cyclic collector off dozens of times (half the time here); they hold
        # no cycles
        gc.disable()
        cursor = connection.cursor()
        cursor.execute(f"SELECT {', '.join(('id', *columns))} FROM images")  # noqa: S608 (our own names)
        rows = cursor.fetchall()
        found = list(zip(*rows)) if rows else [()] * (1 + len(columns))
        del rows
    finally:
        if collecting:
            gc.enable()
        connection.close()
    ids = np.asarray(found[0], np.int64)
    if np.all(ids[1:] > ids[:-1]):  # a scan of the table itself: in rowid order already
        return ids, found[1:]
    order = np.argsort(ids, kind="stable")
    return ids[order], [tuple(map(values.__getitem__, order.tolist())) for values in found[1:]]


def _folder(path: Any) -> str:
    """os.path.dirname of a stored path (absolute and normalised, or a PACS key): as mi outliers --by folder
    groups, 5x faster at 100k paths."""
    head, slash, _ = os.fsdecode(path).rpartition("/")
    return head or slash


@router.get("/map")
def map_summary(request: Request) -> dict[str, Any]:
    """The stored map: its points (the images of the index it holds), the index generation it was made at,
    its method and the fields /api/map/colours colours by; 404 when `mi map` has not run."""
    view = _map_view(request)
    return {"count": int(len(view.ids)), "generation": view.generation, "index_generation": view.index_generation,
            "method": view.method, "fields": list(MAP_FIELDS)}


@router.get("/map/points", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "n little-endian int32 ids, then 2n float32: x0, y0, x1, y1, ..."}})
def map_points(request: Request) -> Response:
    """The map's points as binary: n int32 ids (little-endian), then their n (x, y) float32 pairs."""
    view = _map_view(request)
    return Response(view.points, media_type="application/octet-stream",
                    headers={"X-Map-Count": str(len(view.ids)), "Cache-Control": "no-store"})


@router.get("/map/colours")
def map_colours(request: Request, params: Annotated[ColoursParams, Query()]) -> dict[str, Any]:
    """Each point's value of a field as a code (base64 of n little-endian uint16, in /api/map/points' order)
    into `values` (most frequent first, a missing value as null). Past 65535 distinct values the rarest
    share the last code, and `other` counts their images."""
    view = _map_view(request)
    with view.lock:  # every field from one read of the rows, once per view: switching fields is then instant
        if not view.colours:
            view.colours = _colours(aggregates.index_store(request.app.state), view)
    return view.colours[params.by]


def _colours(store: Any, view: MapView) -> dict[str, dict[str, Any]]:
    """{field: its /api/map/colours answer} for every field of MAP_FIELDS."""
    fields = {by: GROUPINGS[by] for by in MAP_FIELDS}
    ids, columns = _columns(store, tuple(fields.values()))
    rows = _positions(ids, view.ids)
    if np.any(rows < 0):  # removed by mi-index between the view's read and this one
        raise HTTPException(503, "the index changed while the map was read: ask again")
    answers = {}
    for (by, column), stored in zip(fields.items(), columns):
        answers[by] = _coded(by, list(map(_folder, stored)) if column == "path" else stored, rows)
    return answers


def _coded(by: str, stored: list | tuple, rows: np.ndarray) -> dict[str, Any]:
    """The answer of /api/map/colours?by=`by` for the values `stored` of every row, of which the map's
    points are `rows`. (dict and map calls at C speed: no Python code per row.)"""
    distinct = list(dict.fromkeys(stored))
    number = {value: i for i, value in enumerate(distinct)}
    codes = np.fromiter(map(number.__getitem__, stored), np.int64, len(stored))[rows]
    values = [None if value == "" else value for value in distinct]  # an empty value is a missing one
    if "" in number and None in number:
        codes[codes == number[""]] = number[None]
    counts = np.bincount(codes, minlength=len(values))
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]
    rank = np.full(len(values), MAX_CODES - 1, np.int64)
    shown = order[:MAX_CODES - 1] if len(order) >= MAX_CODES else order
    rank[shown] = np.arange(len(shown))
    point_codes = rank[codes].astype("<u2")
    other = int(counts[order[MAX_CODES - 1:]].sum()) if len(order) >= MAX_CODES else 0
    names = [values[i] for i in shown] + (["(other)"] if other else [])
    return {"by": by, "values": names, "codes": base64.b64encode(point_codes.tobytes()).decode("ascii"),
            "other": other}
