"""One search request: the query terms, filters, options and their limits, defined once for every front end.

mi-search's options (retrieval.cli), the server's request models (retrieval.server.models), the client's JSON
body (retrieval.client) and `Searcher.search`'s keywords all derive from OPTIONS here and from
`indexer.filters.FILTER_FIELDS`; `SearchRequest` checks the limits, wherever a request comes from. Imports
nothing heavy: mi-search through a warm server builds one too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from indexer.filters import FILTER_FIELDS, FILTER_NAMES, SearchFilters

from .errors import QueryError
from .grouping import GROUP_FIELDS
from .labels import parse_labels
from .query import QueryTerm

GROUP_CHOICES = tuple(GROUP_FIELDS)  # group= and exclude_same=: "study", "patient"
DEFAULT_K = 10
MAX_K = 10_000             # hits one answer of mi-search or the server may ask for (the library clamps)
MAX_TERMS = 64             # query terms (texts and images)
MAX_LABELS = 256           # zero-shot labels (each costs a text encoding, two with multilabel)
MAX_TEXT_CHARS = 10_000    # one text term or label (the tokenizer keeps its first 77 tokens anyway)
SOFTMAX_NEEDS_TWO = "a softmax needs at least two labels (or score each label on its own)"


@dataclass(frozen=True)
class Option:
    """One option of a search besides its terms and filters: its name (Searcher.search's keyword, the API's
    field, mi-search's option), type, default, help and, for a choice, its choices."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None


OPTIONS = (
    Option("k", int, DEFAULT_K, "Number of hits."),
    Option("min_score", float, None, "Drop hits below this cosine similarity."),
    Option("labels", str, None, 'Comma-separated labels for zero-shot probabilities, e.g. "normal,pneumonia".'),
    Option("multilabel", bool, False, "Score the labels independently (sigmoid), not as a softmax."),
    Option("group", str, None, "One hit per study or patient (its best image, with the number of matches).",
           GROUP_CHOICES),
    Option("duplicates", bool, False,
           "Show exact duplicates (same SOP Instance UID or same content) as separate hits."),
    Option("exclude_same", str, None, "Image queries: leave out the query's own study or patient.", GROUP_CHOICES),
    Option("fold_near", float, None, "Fold near duplicates of the same study: a hit at cosine >= this to a better "
                                     "hit of its study counts among that hit's copies."),
    Option("series", bool, False, "CT and MR: one hit per series (its mean vector; the slice nearest it shown)."),
)
OPTION_NAMES = tuple(option.name for option in OPTIONS)


@dataclass(frozen=True)
class SearchRequest:
    """A search as every front end asks it: parsed terms (empty for a search by vector), the filters, and the
    OPTIONS. Built with `make` from user input; construction checks every limit (QueryError)."""

    terms: tuple[QueryTerm, ...] = ()
    filters: SearchFilters = field(default_factory=SearchFilters)
    k: int = DEFAULT_K
    min_score: float | None = None
    labels: tuple[str, ...] | None = None
    multilabel: bool = False
    group: str | None = None
    duplicates: bool = False
    exclude_same: str | None = None
    fold_near: float | None = None
    series: bool = False

    @classmethod
    def make(cls, terms: Sequence[QueryTerm] = (), *, filters: SearchFilters | None = None,
             **given: Any) -> SearchRequest:
        """A request from user input: `terms` parsed (retrieval.query); the OPTIONS by name (None: the
        default), labels as "a,b" or a list; the filters as a SearchFilters or their fields by name
        (FILTER_FIELDS: dates as YYYY-MM-DD). QueryError for a bad value, TypeError for an unknown name."""
        unknown = set(given) - set(OPTION_NAMES) - set(FILTER_NAMES)
        if unknown:
            raise TypeError(f"search() got unexpected keyword arguments {sorted(unknown)}")
        values = {option.name: given[option.name] for option in OPTIONS if given.get(option.name) is not None}
        if values.get("labels") is not None:
            values["labels"] = tuple(parse_labels(values["labels"]))
        asked = {name: given[name] for name in FILTER_NAMES if name in given}
        if filters is not None and any(value not in (None, "") for value in asked.values()):
            raise TypeError("give filters= or the filters' fields, not both")
        if filters is None:
            try:
                filters = SearchFilters.make(**asked)
            except ValueError as error:  # FilterError: a malformed date
                raise QueryError(str(error)) from None
        return cls(terms=tuple(terms), filters=filters, **values)

    def __post_init__(self) -> None:
        if self.k < 1:  # a larger k than the index holds gives what it holds; MAX_K bounds the front ends
            raise QueryError(f"k must be at least 1, not {self.k}")
        if self.group not in (None, *GROUP_CHOICES) or self.exclude_same not in (None, *GROUP_CHOICES):
            raise QueryError(f"group and exclude_same take one of {', '.join(GROUP_CHOICES)}")
        if self.series and (self.group or self.exclude_same):
            raise QueryError("series searches whole series: not with group or exclude_same", option="series")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise QueryError(f"min_score must be a finite number, not {self.min_score}")
        if self.fold_near is not None and not 0.0 <= self.fold_near <= 1.0:  # NaN fails too
            raise QueryError(f"fold_near is a cosine similarity from 0 to 1, not {self.fold_near}", option="fold_near")
        if any(not math.isfinite(term.weight) for term in self.terms):
            raise QueryError("a query term's weight must be a finite number (not inf or nan)")
        if len(self.terms) > MAX_TERMS:
            raise QueryError(f"a query has at most {MAX_TERMS} terms, not {len(self.terms)}")
        if self.labels is not None and len(self.labels) < 2 and not self.multilabel:
            raise QueryError(SOFTMAX_NEEDS_TWO, option="multilabel")  # here: before a server or a model is asked
        if self.labels is not None and len(self.labels) > MAX_LABELS:
            raise QueryError(f"at most {MAX_LABELS} labels, not {len(self.labels)}")
        texts = [term.value for term in self.terms if term.kind == "text"] + list(self.labels or ())
        if any(len(text) > MAX_TEXT_CHARS for text in texts):
            raise QueryError(f"a query text or label has at most {MAX_TEXT_CHARS} characters")

    def options(self) -> dict[str, Any]:
        """{name: value} of the OPTIONS."""
        return {option.name: getattr(self, option.name) for option in OPTIONS}

    def to_json(self) -> dict[str, Any]:
        """The options and filters as the API's fields (labels comma-separated, dates YYYY-MM-DD); the terms
        are the caller's to encode (an image is sent as its bytes)."""
        labels = None if self.labels is None else ",".join(self.labels)
        return {**self.options(), "labels": labels, **self.filters.to_json()}


__all__ = ["FILTER_FIELDS", "GROUP_CHOICES", "MAX_K", "MAX_TERMS", "OPTIONS", "Option", "SearchRequest"]
