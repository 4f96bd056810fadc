"""A CSV that names indexed images (a `path` or `sop_instance_uid` column, header row) beside
columns of its own: read the same way for labels (`mi evaluate`) and splits (`mi leakage`)."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, TypeVar

Value = TypeVar("Value")

KEY_COLUMNS = ("sop_instance_uid", "sopinstanceuid", "path")  # the first present names the image


def read_keyed_csv(path: Path, error: type[Exception]) -> tuple[list[dict[str, str]], dict[str, str], str | None]:
    """(rows, {lower-cased column: column as written}, the key column or None); `error` (one line) when
    the file cannot be read as CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise error(f"{path} is not a readable CSV file: {e}") from None
    header = {k.strip().lower(): k for k in (rows[0].keys() if rows else []) if k}
    return rows, header, next((header[c] for c in KEY_COLUMNS if c in header), None)


def matched(reader: Any, path: Path, header: dict[str, str], key: str, pairs: list[tuple[str, Value]]
            ) -> tuple[list[tuple[Any, Value]], int]:
    """([(image ids, value)] for the rows whose key names indexed images, rows that name none): a path
    is taken relative to the CSV's folder unless absolute; a SOP Instance UID as it is."""
    if header.get("path") == key:
        pairs = [(item if os.path.isabs(os.path.expanduser(item)) else str(path.parent / item), value)
                 for item, value in pairs]
        found = reader.ids_of_paths([item for item, _ in pairs])
    else:
        found = reader.ids_of_uids([item for item, _ in pairs])
    hits = [(found[item], value) for item, value in pairs if found.get(item)]
    return hits, len(pairs) - len(hits)
