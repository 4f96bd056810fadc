"""Queries -> hits: the `Searcher` API behind `mi-search`.

    from retrieval import Searcher
    hits = Searcher().search("lumbar spine fracture", k=10, modality="CR")
"""
from .errors import EmptyIndexError, ModelMismatchError, QueryError, SearchError
from .query import QueryTerm, parse_query
from .search import Hit, Searcher

__all__ = ["Searcher", "Hit", "QueryTerm", "parse_query", "SearchError", "QueryError",
           "EmptyIndexError", "ModelMismatchError"]
