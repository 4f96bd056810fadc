"""The index folder: SQLite and the vector file (the source of truth) and a FAISS file (a cache of them).

    INDEX_DIR/
      index.sqlite            schema in indexer/store/schema.py: files, images (metadata), series, meta
      embeddings.f16          every image's vector, float16, at a fixed offset by row id (vector_file.py)
      vectors.<ID>.g<N>.faiss the FAISS index of generation N of the database whose meta.index_id
                              is ID; verified on open (digest, dimension, ids), else rebuilt
      index.lock              held by the one mi-index that may write at a time

Each committed batch bumps `generation`. A FAISS file is used only when its generation is
the database's, so a reader never sees vectors that SQLite does not hold (and the other
way round); otherwise the reader builds the index from SQLite inside one read
transaction, a consistent snapshot even while mi-index is writing. Row ids are never
reused (AUTOINCREMENT), and they are the FAISS ids.
"""
from ..errors import ModelMismatchError, StoreError
from .database import DB_NAME, sqlite_uri, storage_error
from .identity import check_same_model
from .index_store import IndexStore
from .reads import METADATA_FIELDS, ContentLookup

__all__ = ["DB_NAME", "METADATA_FIELDS", "ContentLookup", "IndexStore", "ModelMismatchError", "StoreError",
           "check_same_model", "sqlite_uri", "storage_error"]
