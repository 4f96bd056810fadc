"""Read-only access to an index for the dataset checks: its rows' fields as compact columns and
its vectors in batches. The one place of this package that speaks SQL (plain SELECTs), so the
checks survive changes inside the store."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import text

# The stored fields a check may read; never names, birth dates or IDs (the index holds none).
FIELDS = ("path", "frame", "content_hash", "width", "height", "source_format", "sop_instance_uid",
          "study_instance_uid", "series_instance_uid", "modality", "body_part", "view_position",
          "study_date", "series_description", "patient_hash")


def _py_path(value: Any) -> Any:
    return os.fsdecode(value) if isinstance(value, bytes) else value


class IndexReader:
    """One index opened read-only. `columns(...)` gives fields of every row, `batches()` the
    vectors in id order; both from one consistent read of the database."""

    def __init__(self, index_dir: str | os.PathLike | None = None) -> None:
        from indexer.location import default_index_dir
        from indexer.store import IndexStore

        self.folder = Path(index_dir or default_index_dir()).expanduser()
        self.store = IndexStore.open(self.folder, readonly=True)
        self.folder = self.store.folder

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> IndexReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ fields
    def generation(self) -> int:
        return self.store.generation()

    @property
    def dim(self) -> int:
        return int((self.store.model_info or {}).get("dim") or 0)

    def ids(self) -> np.ndarray:
        with self.store.engine.connect() as conn:
            return np.asarray(conn.execute(text("SELECT id FROM images ORDER BY id")).scalars().all(), np.int64)

    def columns(self, names: Sequence[str]) -> dict[str, Any]:
        """{"id": int64 array, name: list of values} for every row, in id order."""
        unknown = set(names) - set(FIELDS)
        if unknown:
            raise ValueError(f"not stored fields: {sorted(unknown)}")
        with self.store.engine.connect() as conn:
            rows = conn.execute(text(f"SELECT id{''.join(', ' + n for n in names)} FROM images ORDER BY id")).all()
        out: dict[str, Any] = {"id": np.asarray([r[0] for r in rows], np.int64)}
        for i, name in enumerate(names, start=1):
            out[name] = [_py_path(r[i]) for r in rows] if name == "path" else [r[i] for r in rows]
        return out

    def rows(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """{id: stored fields} (IndexStore.rows), in chunks: any number of ids."""
        ids = [int(i) for i in ids]
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), 5000):
            found.update(self.store.rows(ids[start:start + 5000]))
        return found

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """float32 (len(ids), D) in the order of `ids` (chunked IndexStore.vectors)."""
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([self.store.vectors(ids[s:s + 5000]) for s in range(0, len(ids), 5000)])

    def ids_under(self, folder: str | os.PathLike, *, stored: bool = False) -> np.ndarray:
        """Ids of the images of files under a folder (or that file), resolved as mi-index resolves paths;
        `stored`: the folder as the index stores paths (absolute, resolved), the file system never asked."""
        from indexer.filters import SearchFilters

        filters = SearchFilters(under=os.fspath(folder)) if stored else SearchFilters.make(under=folder)
        found = self.store.filter_ids(filters)
        return np.sort(found) if found is not None else self.ids()

    def ids_of_paths(self, paths: Sequence[str]) -> dict[str, list[int]]:
        """{path: ids of its images} for the given paths (resolved like mi-index does)."""
        wanted = {os.path.realpath(Path(p).expanduser()): p for p in paths}
        found: dict[str, list[int]] = {}
        keys = list(wanted)
        with self.store.engine.connect() as conn:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                marks = ", ".join(f":p{i}" for i in range(len(chunk)))
                for row_id, path in conn.execute(text(f"SELECT id, path FROM images WHERE path IN ({marks})"),
                                                 {f"p{i}": p for i, p in enumerate(chunk)}):
                    found.setdefault(wanted[_py_path(path)], []).append(int(row_id))
        return found

    def ids_of_uids(self, uids: Sequence[str]) -> dict[str, list[int]]:
        """{SOP Instance UID: ids of its images}."""
        found: dict[str, list[int]] = {}
        uids = list(dict.fromkeys(uids))
        with self.store.engine.connect() as conn:
            for start in range(0, len(uids), 500):
                chunk = uids[start:start + 500]
                marks = ", ".join(f":u{i}" for i in range(len(chunk)))
                for row_id, uid in conn.execute(text(f"SELECT id, sop_instance_uid FROM images WHERE "
                                                     f"sop_instance_uid IN ({marks})"),
                                                {f"u{i}": u for i, u in enumerate(chunk)}):
                    found.setdefault(uid, []).append(int(row_id))
        return found

    def exact_groups(self) -> list[tuple[str, list[int]]]:
        """Groups of two or more images that are exact duplicates: ("sop", ids) sharing a SOP
        Instance UID and frame, ("content", ids) whose files have the same bytes (the index's
        content_hash is a BLAKE2b of the whole file) and the same frame."""
        groups = []
        with self.store.engine.connect() as conn:
            for kind, column in (("sop", "sop_instance_uid"), ("content", "content_hash")):
                rows = conn.execute(text(
                    f"SELECT group_concat(id) FROM images WHERE {column} IS NOT NULL GROUP BY {column}, frame "
                    f"HAVING count(*) > 1")).scalars()
                groups += [(kind, sorted(int(i) for i in ids.split(","))) for ids in rows]
        return groups

    # ------------------------------------------------------------ vectors
    def batches(self, size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) of every image in id order, `size` at a time, read by id
        range (no OFFSET scans), so memory holds one batch."""
        from indexer.store.reads import raw_ids

        last = -1
        with self.store.engine.connect() as conn:
            while True:
                ids = raw_ids(conn, "SELECT id FROM images WHERE id > ? ORDER BY id LIMIT ?", (last, int(size)))
                if not len(ids):
                    return
                last = int(ids[-1])
                yield ids, self.store.vector_file.read(ids)
