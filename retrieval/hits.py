"""A search result as every front end sees it: the same record from a local `Searcher` and from
a running `mi-serve`, so `mi-search` prints both the same way. Imports nothing heavy."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Hit:
    """One search result. `metadata` holds the stored fields of the row (path, frame, modality,
    body_part, view_position, study_date, ...); `labels` the zero-shot probabilities if asked."""

    rank: int
    score: float
    id: int
    path: str
    metadata: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, float] | None = None
    copies: int = 1            # exact duplicates shown as this one hit (itself included)
    in_group: int = 1          # matching images of its study or patient, with group=
    missing: bool = False      # the file is gone from disk since it was indexed
    viewer_url: str | None = None  # a PACS instance: the link that opens it in the index's viewer

    def to_dict(self) -> dict[str, Any]:
        """A flat, JSON-ready dict: rank, score, id, path, copies, in_group, missing, the
        metadata fields (Study/Series/SOP Instance UIDs among them), labels if any, and for an
        instance indexed from a PACS its `wado_rs_url` and, where the index has a viewer URL
        template (mi-index --viewer-url), its `viewer_url`."""
        from indexer.pacs_keys import wado_url
        row = {"rank": self.rank, "score": round(self.score, 6), "id": self.id, "path": self.path,
               "copies": self.copies, "in_group": self.in_group, "missing": self.missing}
        row.update({key: _jsonable(value) for key, value in self.metadata.items() if key not in row})
        if wado_url(self.path):  # an instance indexed from a PACS: where to retrieve it
            row["wado_rs_url"] = wado_url(self.path)
        if self.viewer_url:
            row["viewer_url"] = self.viewer_url
        if self.labels is not None:
            row["labels"] = {label: round(p, 6) for label, p in self.labels.items()}
        return row


def _jsonable(value: Any) -> Any:
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value
