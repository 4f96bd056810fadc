"""One run of mi-index: items in, index out (plan, decode in workers, encode, commit)."""
from .pipeline import Indexer, Summary

__all__ = ["Indexer", "Summary"]
