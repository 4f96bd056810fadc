"""IndexStore, the one object the rest of the program holds for an index folder: opened (and
migrated) by `IndexStore.open`, locked by the one writer, and made of one part per job: meta and
model identity (`identity`), reads (`reads`), writes (`writes`), the vectors' file (`vector_file`)
and the FAISS cache (`faiss_cache`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from sqlalchemy.engine import Engine

from .database import give_writer_cache, open_engine, release_writer_lock, take_writer_lock
from .faiss_cache import FaissCache
from .identity import Identity
from .reads import Reads
from .vector_file import VectorFile
from .writes import Writes


class IndexStore(Identity, Reads, Writes, FaissCache):
    """One index folder. Open with `IndexStore.open(path, create=..., readonly=...)`."""

    def __init__(self, folder: Path, engine: Engine, readonly: bool):
        self.folder = folder
        self.engine = engine
        self.readonly = readonly
        self.vector_file = VectorFile(folder)
        self._lock_file: IO | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = False, readonly: bool = False) -> IndexStore:
        folder = Path(path).expanduser().resolve()
        return cls(folder, open_engine(folder, create=create, readonly=readonly), readonly)

    def lock(self) -> None:
        """Take the writer's lock; a second mi-index on the same index is refused, not interleaved."""
        self._lock_file = take_writer_lock(self.folder)
        give_writer_cache(self.engine)
        self.clear_removed_vectors()  # a writer killed between its commit and clearing

    def close(self) -> None:
        self.engine.dispose()
        if self._lock_file is not None:
            release_writer_lock(self._lock_file)
            self._lock_file = None

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
