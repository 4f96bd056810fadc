"""Labels for some of an index's images, read from a CSV file for `mi evaluate`.

The file has a header row, a `path` or `sop_instance_uid` column naming the image and a `label`
or `labels` column; a cell may hold several labels separated by `;`, and an image may have
several rows: its labels are the union (so both "one row per image" and "one row per label"
read the same). Relative paths are relative to the CSV file's folder. A path names every frame
of its file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.errors import MIError

from .keyed_csv import matched, read_keyed_csv

SEPARATOR = ";"


class LabelsError(MIError, ValueError):
    """A labels file that cannot be read or names nothing usable."""


@dataclass
class Labels:
    """Labelled images: sorted ids, label names (sorted) and a (images, labels) bool matrix."""

    ids: np.ndarray
    names: list[str]
    matrix: np.ndarray
    unmatched: int = 0          # rows naming nothing in the index
    notes: list[str] = field(default_factory=list)


def read_labels(reader, path: Path) -> Labels:
    rows, header, key = read_keyed_csv(path, LabelsError)
    label_column = header.get("labels") or header.get("label")
    if key is None or label_column is None:
        raise LabelsError(f"{path} needs a header row with a `path` or `sop_instance_uid` column and a `label` or "
                          f"`labels` column (labels separated by {SEPARATOR!r}); it has {sorted(header) or 'none'}")
    pairs = [((row.get(key) or "").strip(), [v.strip() for v in (row.get(label_column) or "").split(SEPARATOR)])
             for row in rows]
    pairs = [(item, [v for v in values if v]) for item, values in pairs if item]
    hits, unmatched = matched(reader, path, header, key, pairs)
    by_id: dict[int, set[str]] = {}
    for ids, values in hits:
        for i in ids:
            by_id.setdefault(int(i), set()).update(values)
    by_id = {i: v for i, v in by_id.items() if v}
    names = sorted({v for values in by_id.values() for v in values})
    if not by_id:
        raise LabelsError(f"no row of {path} names a labelled image of the index ({unmatched} rows name nothing in it)")
    ids = np.asarray(sorted(by_id), np.int64)
    column = {name: c for c, name in enumerate(names)}
    matrix = np.zeros((len(ids), len(names)), bool)
    for r, i in enumerate(ids):
        matrix[r, [column[v] for v in by_id[int(i)]]] = True
    labels = Labels(ids, names, matrix, unmatched)
    if unmatched:
        labels.notes.append(f"{unmatched} rows of {path.name} name nothing in the index")
    return labels
