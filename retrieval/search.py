"""The retrieval API: queries -> hits, over an index built by `mi-index`.

    from retrieval import Searcher
    with Searcher() as s:                                   # default index and model, as mi-search
        hits = s.search("lumbar spine fracture", k=10, modality="CR")
        hits = s.search(image="case.dcm", k=10)
        hits = s.search(["2:pleural effusion", "+", "case12.dcm", "-", "pacemaker"])
        s.classify("case.dcm", ["normal", "pneumothorax"])  # {"normal": 0.8, "pneumothorax": 0.2}

Each model tower is loaded at most once per Searcher, and only when a query needs it: a text query
loads the text tower, an image query the image tower. The model is the one given (`model=` or
MI_MODEL), else the one recorded in the index, else the encoder's default; a model whose
fingerprint differs from the index's is refused.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import labels as zero_shot
from .errors import EmptyIndexError, QueryError
from .grouping import GROUP_FIELDS, Candidate, collapse
from .hits import Hit
from .live_index import LiveIndex
from .query import QueryTerm, combine, parse_query
from .request import SOFTMAX_NEEDS_TWO, SearchRequest

if TYPE_CHECKING:
    from indexer.filters import SearchFilters

log = logging.getLogger(__name__)
TEXT_CACHE_SIZE = 1024  # text query embeddings a Searcher keeps (see Searcher._text_vectors)
FILTER_CACHE_SIZE = 16  # allowed sets of recent filters a Searcher keeps, per generation (see Searcher._allowed)
# ... and the memory they may hold: a bitmap (max id / 8 bytes) each, and a filter's own lists or exact rows
# (indexer.store.vectors: at most OWN_LISTS_BYTES each; 10% of 1M images: 205 MB), two of them at a time
FILTER_CACHE_BYTES = 512 << 20

class Searcher:
    """Search one index. `index`: the index folder (default: MI_INDEX, else the per-user folder
    that mi-index uses). `model`: a model folder or Hugging Face id, or an already loaded encoder
    (default: MI_MODEL, else the model recorded in the index). `device`: "cpu", "cuda" or None.

    Raises indexer.store's IndexNotFoundError / IndexFormatError when there is no usable index,
    EmptyIndexError when it holds no images."""

    def __init__(self, index: str | Path | None = None, model: Any = None,
                 device: str | None = None) -> None:
        from indexer.location import default_index_dir
        from indexer.store import IndexStore

        self.index_dir = Path(index or default_index_dir()).expanduser()
        self.device = device
        self._store = IndexStore.open(self.index_dir, readonly=True)
        self._faiss: LiveIndex | None = None
        self._faiss_lock = threading.Lock()
        self._tower_lock = threading.Lock()
        self._text_cache: dict[str, np.ndarray] = {}
        self._text_cache_lock = threading.Lock()
        self._filter_cache: OrderedDict[tuple[int, Any], Any] = OrderedDict()  # -> vectors.Allowed
        self._count_cache: tuple[int, int] = (-1, 0)
        self._stats_cache: tuple[tuple, dict[str, Any]] = ((), {})
        self._cache_lock = threading.Lock()
        self._towers: dict[str, Any] = {}
        self._loaded_model = model if hasattr(model, "encode_texts") else None
        self._model_source = None if self._loaded_model else model
        self._model_info = self._store.model_info or {}
        if self._store.count() == 0:
            self._store.close()
            raise EmptyIndexError(f"the index at {self.index_dir} is empty: add images with "
                                  f"`mi-index PATH --index {self.index_dir}`")

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model_info(self) -> dict[str, Any]:
        """What the index records about its model: fingerprint, dim, source."""
        return dict(self._model_info)

    def __len__(self) -> int:
        """Images in the index now: counted once per generation (a count(*) of a million rows
        took half of an unfiltered query)."""
        generation = self._store.generation()
        with self._cache_lock:
            if self._count_cache[0] == generation:
                return self._count_cache[1]
        count = self._store.count()  # may be a newer generation's: only ever a bound for fetching
        with self._cache_lock:
            self._count_cache = (generation, count)
        return count

    def _allowed(self, filters: SearchFilters | None) -> Any:
        """What a filter allows (an indexer.store.vectors.Allowed: its FAISS selector and per-list counts),
        fetched and built once per (generation, filter): the web page asks the same filter at every page
        and refinement. The FILTER_CACHE_SIZE most recent are kept, within FILTER_CACHE_BYTES."""
        if not filters:
            return None
        from indexer.store.vectors import Allowed

        key = (self._store.generation(), filters)
        with self._cache_lock:
            if key in self._filter_cache:
                self._filter_cache.move_to_end(key)
                return self._filter_cache[key]
        allowed = Allowed(self._store.filter_ids(filters), stored=self._store.vector_file.read)
        with self._cache_lock:
            self._filter_cache[key] = allowed
            while len(self._filter_cache) > 1 and (len(self._filter_cache) > FILTER_CACHE_SIZE or sum(
                    kept.nbytes for kept in self._filter_cache.values()) > FILTER_CACHE_BYTES):
                self._filter_cache.popitem(last=False)
        return allowed

    def stats(self) -> dict[str, Any]:
        """The index's counts (images, files, skipped by reason, modalities), folders, model,
        size, last run and the generation that searches answer from now: counted again only when
        the store's `version` moved (at 1M the counts took 0.7-1 s, and /api/health asks them)."""
        version = self._store.version()
        with self._cache_lock:
            if self._stats_cache[0] == version:
                return dict(self._stats_cache[1])
        stats = {**self._store.status(), "generation": self._store.generation()}
        with self._cache_lock:
            self._stats_cache = (version, stats)
        return dict(stats)

    # ------------------------------------------------------------------ models
    def encoder(self, tower: str) -> Any:
        """The encoder with `tower` ("text" or "image") loaded, loading it on first use (once,
        however many threads ask at the same time)."""
        with self._tower_lock:
            return self._encoder(tower)

    def _encoder(self, tower: str) -> Any:
        if self._loaded_model is not None:
            if not self._towers:
                self._check_model(self._loaded_model)
                self._towers = {"text": self._loaded_model, "image": self._loaded_model}
            return self._loaded_model
        if tower not in self._towers:
            from encoders import load_model

            from indexer.model_choice import chosen_model_source

            source = chosen_model_source(self._model_source, self.model_info.get("source"))
            log.info("loading the %s tower of %s", tower, source or "the default model")
            model = load_model(source, device=self.device, towers=(tower,))
            self._check_model(model)
            self._towers[tower] = model
        return self._towers[tower]

    def _check_model(self, model: Any) -> None:
        self._store.check_model(model.fingerprint, model.dim, model.source, record=False)  # the indexer's one rule

    def embed(self, query: str | Sequence[str] | Sequence[QueryTerm] | None = None, *,
              image: str | Path | None = None, force: str | None = None) -> np.ndarray:
        """The unit query vector (D,) of a query (see `parse_query`) and/or a query image."""
        terms = _terms(query, force) + ([QueryTerm("image", str(image))] if image is not None else [])
        if not terms:
            raise QueryError("nothing to search for: give a text query or an image")
        texts = [i for i, term in enumerate(terms) if term.kind == "text"]
        images = [i for i, term in enumerate(terms) if term.kind == "image"]
        pictures = [load_query_image(terms[i].value) for i in images]  # fail before loading a model
        rows: dict[int, np.ndarray] = {}
        if texts:
            rows.update(zip(texts, self._text_vectors([terms[i].value for i in texts])))
        if images:
            rows.update(zip(images, self.encoder("image").encode_images(pictures)))
        vectors = np.stack([rows[i] for i in range(len(terms))])
        return combine(vectors, [term.weight for term in terms])

    def _text_vectors(self, texts: list[str]) -> list[np.ndarray]:
        """Text embeddings, each text encoded once per Searcher: a warm server re-filtering or
        paging the same query (the web page does it at every filter change) skips the tower.
        The TEXT_CACHE_SIZE most recent texts are kept (4 KB each at 1024-d)."""
        with self._text_cache_lock:
            known = {text: self._text_cache[text] for text in texts if text in self._text_cache}
        missing = [text for text in dict.fromkeys(texts) if text not in known]
        fresh = dict(zip(missing, self.encoder("text").encode_texts(missing))) if missing else {}
        vectors = {**known, **fresh}
        with self._text_cache_lock:
            for text, vector in vectors.items():  # now the most recent
                self._text_cache.pop(text, None)
                self._text_cache[text] = vector
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                del self._text_cache[next(iter(self._text_cache))]
        return [vectors[text] for text in texts]

    # ------------------------------------------------------------------ search
    def search(self, query: str | Sequence[str] | Sequence[QueryTerm] | SearchRequest | None = None, *,
               image: str | Path | None = None, vector: np.ndarray | None = None, force: str | None = None,
               filters: SearchFilters | None = None, **options: Any) -> list[Hit]:
        """The k best hits for a query, best first.

        query: a text, an image path, CLI-style tokens with + / - and WEIGHT:QUERY (see `retrieval.query`),
        or a ready `retrieval.request.SearchRequest`; image: an image file; vector: a ready unit query
        vector (D,). options: those of `SearchRequest` (retrieval.request.OPTIONS): k=10, min_score,
        labels (adds zero-shot probabilities), multilabel, group, duplicates, exclude_same, fold_near; filters: an
        `indexer.filters.SearchFilters`, or its fields as keywords (modality, body_part, view, since, until,
        under); they apply before the top-k cut. Exact duplicates (same SOP Instance UID or content) are one
        hit unless `duplicates`; group="study"/"patient" gives one hit per study or patient;
        exclude_same="study"/"patient" drops the query image's own study or patient; fold_near=0.98 folds a hit at
        cosine >= 0.98 to a better hit of its study into that hit's copies (see `retrieval.grouping`)."""
        if isinstance(query, SearchRequest):
            request = query
        else:
            terms = _terms(query, force) + ([QueryTerm("image", str(image))] if image is not None else [])
            request = SearchRequest.make(terms, filters=filters, **options)
        return self.answer(request, vector)

    def answer(self, request: SearchRequest, vector: np.ndarray | None = None) -> list[Hit]:
        """The hits of a search request (`vector`: a ready unit query vector instead of its terms)."""
        terms = list(request.terms)
        if vector is None:
            vector = self.embed(terms)
        elif terms:
            raise QueryError("give either a query vector or a query, not both")
        exclude = self._own(terms, request.exclude_same) if request.exclude_same else None
        allowed = self._allowed(request.filters)
        if allowed is not None and len(allowed) == 0:
            raise QueryError(self._no_match(request.filters))
        vector = np.asarray(vector, np.float32)
        if request.series:
            hits = self._series_hits(vector, request)
        else:
            hits = self._collapsed_hits(vector, request.k, allowed, request.min_score, request.duplicates,
                                        request.group, exclude, request.fold_near)
        if request.labels and hits:
            label_list = list(request.labels)
            probabilities = self._label_probabilities(self._stored_vectors([h.id for h in hits]),
                                                      label_list, request.multilabel)
            for hit, row in zip(hits, probabilities):
                hit.labels = dict(zip(label_list, map(float, row)))
        return hits

    def _collapsed_hits(self, vector: np.ndarray, k: int, allowed: Any, min_score: float | None,
                        duplicates: bool, group: str | None, exclude: dict | None,
                        fold_near: float | None = None) -> list[Hit]:
        """The top k after collapsing duplicates and groups (and with `fold_near` near copies within a
        study): candidates are fetched in growing rounds until k hits stand or the index (or filter) has
        no more."""
        plain = duplicates and group is None and exclude is None and fold_near is None
        available = len(allowed) if allowed is not None else len(self)
        fetch = k if plain else min(available, 4 * k + 16)
        while True:
            found = self._checked_search(vector, fetch, allowed)
            found = [(score, row_id) for score, row_id in found if min_score is None or score >= min_score]
            rows = self._store.rows([i for _, i in found])
            vectors = self._study_mates_vectors(rows) if fold_near is not None else {}
            candidates = [Candidate(score, row_id, rows[row_id], vectors.get(row_id))
                          for score, row_id in found if row_id in rows]
            collapsed = collapse(candidates, duplicates=duplicates, group=group, exclude=exclude, fold_near=fold_near)
            if plain or len(collapsed) >= k or fetch >= available or len(found) < fetch:
                break
            fetch = min(available, fetch * 4)
        link = self._viewer_links()
        return [Hit(rank, c.best.score, c.best.id, str(c.best.row.get("path")), dict(c.best.row),
                    copies=c.copies, in_group=c.in_group, missing=_is_missing(c.best.row.get("path")),
                    viewer_url=link(str(c.best.row.get("path"))))
                for rank, c in enumerate(collapsed[:k], start=1)]

    def _study_mates_vectors(self, rows: dict[int, dict[str, Any]]) -> dict[int, np.ndarray]:
        """{id: stored vector} of the candidates that share their study with another candidate (only
        those can fold into each other), read from SQLite in one batch."""
        studies: dict[str, list[int]] = {}
        for row_id, row in rows.items():
            if row.get("study_instance_uid"):
                studies.setdefault(row["study_instance_uid"], []).append(row_id)
        wanted = [row_id for ids in studies.values() if len(ids) > 1 for row_id in ids]
        return dict(zip(wanted, self._stored_vectors(wanted))) if wanted else {}

    def _series_hits(self, vector: np.ndarray, request: SearchRequest) -> list[Hit]:
        """The k best CT/MR series (indexer.store.series), searched exactly over their mean vectors:
        each hit is the series' representative slice, with `in_group` and `series_slices` its number
        of slices; filters keep a series when one of its slices matches them."""
        series, vectors = self._store.series(request.filters or None)
        if not series:
            raise QueryError("no CT or MR series in the index" + (f" matches {request.filters.describe()}"
                                                                  if request.filters else ""), option="series")
        scores = vectors @ vector
        order = np.argsort(-scores, kind="stable")[:request.k]
        chosen = [(float(scores[i]), series[i]) for i in order
                  if request.min_score is None or scores[i] >= request.min_score]
        rows = self._store.rows([row[4] for _, row in chosen])
        link = self._viewer_links()
        hits = []
        for score, (uid, _study, _modality, slices, representative) in chosen:
            row = rows.get(representative)
            if row is None:  # removed by mi-index since the series was read
                continue
            hits.append(Hit(len(hits) + 1, score, representative, str(row.get("path")),
                            {**row, "series_slices": slices}, in_group=slices,
                            missing=_is_missing(row.get("path")), viewer_url=link(str(row.get("path")))))
        return hits

    def _viewer_links(self):
        """key -> its viewer link (or None), by the template the index holds now (mi-index
        --viewer-url may set it while a server runs)."""
        from indexer.viewer_links import viewer_url

        template = self._store.viewer_template
        return lambda key: viewer_url(template, key)

    def _own(self, terms: list[QueryTerm], what: str) -> dict[str, set[str]]:
        """The query images' own studies or patients (exclude_same): from the index when the
        image is indexed (same content), else from the file's DICOM header."""
        from indexer.decode import content_hash

        field_name = GROUP_FIELDS[what]
        own: set[str] = set()
        images = [term.value for term in terms if term.kind == "image"]
        if not images:
            raise QueryError(f"exclude_same={what} needs an image query")
        for path in images:
            rows = self._store.images_with_hash(content_hash(Path(path).expanduser().read_bytes()))
            values = {row[field_name] for row in rows if row.get(field_name)}
            if not values:
                key = self._patient_key() if what == "patient" else None
                values = {load_query_file(path, patient_key=key).metadata.get(field_name)} - {None}
            own |= values
        return {field_name: own}

    def _patient_key(self) -> bytes:
        """The index's own patient key, checked against the index and never created: another key
        would silently give other pseudonyms, and exclude nothing."""
        from indexer.errors import StoreError
        try:
            return self._store.patient_key(searching=True)
        except StoreError as e:
            raise QueryError(f"excluding the query's patient needs the index's patient key: {e}") from None

    def _no_match(self, filters: SearchFilters) -> str:
        held = []
        for field, _value in filters.set():
            if field.compare == "equal":  # what the index does hold of a column compared equal
                values = ", ".join(f"{v} ({n})" for v, n in self._store.values(field.column).items())
                held.append(f"its {field.plural}: {values or 'none recorded'}")
        return f"no image in the index matches {filters.describe()}" + ("; " + "; ".join(held) if held else "")

    def vector_of(self, image_id: int) -> np.ndarray:
        """The stored unit vector (D,) of an indexed image ("more like this"); QueryError if no such id."""
        try:
            return self._store.vectors([int(image_id)])[0]
        except KeyError:
            raise QueryError(f"no image with id {image_id} in the index") from None

    def image(self, image_id: int) -> dict[str, Any]:
        """The stored fields of an indexed image; QueryError if no such id."""
        rows = self._store.rows([int(image_id)])
        if int(image_id) not in rows:
            raise QueryError(f"no image with id {image_id} in the index")
        return {"id": int(image_id), **rows[int(image_id)]}

    def _checked_search(self, vector: np.ndarray, k: int, allowed: Any) -> list[tuple[float, int]]:
        """(score, id) of the top k, best first, each score recomputed from the vector SQLite
        holds: the FAISS file is a cache, and a damaged one (a flipped bit gave a "cosine" of
        1391.99) must never reach the user. A score that disagrees with SQLite's by more than
        fp16 storage explains means the cache is damaged: rebuild it from SQLite and search again.
        An IVF-PQ index (a memory budget) is coarse by design: it proposes RERANK_FACTOR times k
        candidates, and the exact scores rank them."""
        for attempt in range(2):
            scores, ids, coarse = self._vector_search(vector[None], k, allowed)
            found = [int(i) for i in ids[0] if i >= 0]
            if not found:
                return []
            try:
                exact = self._stored_vectors(found) @ vector
            except KeyError:  # rows removed by mi-index since this FAISS index was loaded
                if attempt == 1:
                    raise
                self._faiss = None  # the newest committed state, on the next try
                continue
            if coarse or np.all(np.abs(exact - scores[0][:len(found)]) <= 0.02) or attempt == 1:
                break
            log.warning("the FAISS cache of %s disagrees with SQLite: rebuilding it from SQLite", self.index_dir)
            rebuilt = self._store.rebuild_faiss()
            with self._faiss_lock:
                self._faiss = LiveIndex.of(rebuilt, rebuilt, self._store.generation(), None)
        order = np.argsort(-exact, kind="stable")[:k]
        return [(float(np.clip(exact[j], -1.0, 1.0)), found[j]) for j in order]

    def _vector_search(self, queries: np.ndarray, k: int, allowed: Any) -> tuple[np.ndarray, np.ndarray, bool]:
        """(scores, ids, coarse): the index's top k, or RERANK_FACTOR times k candidates with
        approximate scores (coarse) from an IVF-PQ index (FILTERED_RERANK_FACTOR times under a filter)."""
        from indexer.store import vectors

        with self._faiss_lock:  # one reload at a time, however many threads search
            # Live index: every search answers from the newest committed generation (one cheap
            # read of meta), so an open Searcher sees what mi-index added and removed since: as a
            # delta over the FAISS index it holds while the writer keeps the file (small changes),
            # by reloading the file when the writer rewrote it.
            live = self._faiss
            if live is None or self._store.generation() != live.generation:
                live = live.updated(self._store) if live is not None else None
                if live is None:
                    index, generation = self._store.load_faiss_with_generation()
                    gpu = index if self.device == "cpu" else vectors.to_gpu(index)
                    live = LiveIndex.of(index, gpu, generation, self._store.faiss_file_name())
                self._faiss = live
        if queries.shape[1] != live.base.d:
            raise QueryError(f"query vectors have {queries.shape[1]} dimensions, the index {live.base.d}")
        coarse = vectors.index_kind(live.base) == "ivfpq"
        factor = (vectors.RERANK_FACTOR if allowed is None else vectors.FILTERED_RERANK_FACTOR) if coarse else 1
        return (*live.search(queries, k, allowed, factor), coarse)

    def _stored_vectors(self, ids: list[int]) -> np.ndarray:
        return self._store.vectors(ids)

    # ------------------------------------------------------------------ zero-shot labels
    def classify(self, image: str | Path | int | Any, labels: str | Sequence[str], *,
                 multilabel: bool = False) -> dict[str, float]:
        """Zero-shot probabilities of `labels` for one image (a file path, an indexed image's id,
        or a PIL image / array): softmax over the labels with the model's logit scale, or one
        sigmoid per label with `multilabel` (see retrieval.labels)."""
        # The request's limits (MAX_LABELS, MAX_TEXT_CHARS), as every search's labels.
        label_list = list(SearchRequest.make(labels=labels, multilabel=True).labels or ())
        if isinstance(image, int):
            vector = self.vector_of(image)[None, :]
        else:
            picture = load_query_image(image) if isinstance(image, (str, Path)) else image
            vector = self.encoder("image").encode_images([picture])
        probabilities = self._label_probabilities(vector, label_list, multilabel)[0]
        return dict(zip(label_list, map(float, probabilities)))

    def _label_probabilities(self, image_vectors: np.ndarray, label_list: list[str],
                             multilabel: bool) -> np.ndarray:
        text = self.encoder("text")
        label_vectors = text.encode_texts(label_list)
        if not multilabel:
            if len(label_list) < 2:
                raise QueryError(SOFTMAX_NEEDS_TWO, option="multilabel")
            return zero_shot.softmax_probabilities(image_vectors, label_vectors, text.logit_scale)
        negations = text.encode_texts([zero_shot.NEGATION_TEMPLATE.format(label) for label in label_list])
        return zero_shot.contrast_probabilities(image_vectors, label_vectors, negations, text.logit_scale)


def _terms(query: Any, force: str | None) -> list[QueryTerm]:
    if query is None:
        return []
    if isinstance(query, QueryTerm):
        return [query]
    if not isinstance(query, (str, Path)) and query and all(isinstance(t, QueryTerm) for t in query):
        return list(query)
    return parse_query(query, force=force)


def _is_missing(path: str | None) -> bool:
    return bool(path) and os.path.isabs(path) and not os.path.exists(path)


def load_query_image(path: str | Path) -> Any:
    """A query image decoded exactly as the indexer decodes files (DICOM windowing included;
    multi-frame files give their middle frame). Raises QueryError when it cannot be read."""
    return load_query_file(path).frames[0][1]


def load_query_file(path: str | Path, with_patient_key: bool = False, patient_key: bytes | None = None) -> Any:
    """The query file decoded as the indexer decodes it (`indexer.decode.Decoded`: frames and
    metadata, the patient pseudonym with `patient_key`, or `with_patient_key` the user's key).
    QueryError when unreadable."""
    from indexer.decode import DecodeError, decode_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise QueryError(f"query image not found: {path}")
    key = patient_key
    if with_patient_key and key is None:
        from indexer.privacy import PatientKeyError
        from indexer.privacy import patient_key as read_key
        try:
            key = read_key(create=False)  # a search never makes a key
        except PatientKeyError as e:
            raise QueryError(f"excluding the query's patient needs the index's patient key: {e}") from None
    try:
        decoded = decode_file(path, patient_key=key)
    except DecodeError as error:
        raise QueryError(f"cannot read the query image {path}: {error}") from None
    if not decoded.frames:
        raise QueryError(f"cannot read the query image {path}: no image in it")
    return decoded
