"""The index folder: SQLite (the source of truth) and a FAISS file (a cache of it)."""
from ..errors import (IndexBusyError, IndexDamagedError, IndexFormatError, IndexNotFoundError, IndexReadOnlyError,
                      ModelMismatchError, StorageFullError, StoreError)
from .index_store import DB_NAME, METADATA_FIELDS, IndexStore, sqlite_uri, storage_error

__all__ = ["DB_NAME", "METADATA_FIELDS", "IndexStore", "sqlite_uri", "storage_error", "IndexBusyError",
           "IndexDamagedError", "IndexFormatError", "IndexNotFoundError", "IndexReadOnlyError", "ModelMismatchError",
           "StorageFullError", "StoreError"]
