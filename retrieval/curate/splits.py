"""Which split (train, test, ...) each indexed image belongs to: from folders, from a CSV
(path or SOP Instance UID -> split), or from a stored field. An image may land in two splits
(nested folders, a CSV naming it twice): that is leakage of its own."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.errors import MIError

from .keyed_csv import matched, read_keyed_csv
from .reader import FIELDS


class SplitError(MIError, ValueError):
    """Splits that cannot be read or make no sense (one split, a CSV without the columns)."""


SPLIT_FIELDS = tuple(f for f in FIELDS if f not in ("path", "frame", "content_hash"))


@dataclass
class Splits:
    """{split name: sorted ids}, and what could not be placed."""

    members: dict[str, np.ndarray]
    unmatched: int = 0           # CSV rows naming nothing in the index
    notes: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return list(self.members)


def parse_split_option(value: str) -> tuple[str, Path]:
    """"train=DIR" -> ("train", DIR)."""
    name, sep, folder = value.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise SplitError(f"--split takes NAME=FOLDER (e.g. --split train=data/train), not {value!r}")
    return name.strip(), Path(folder.strip()).expanduser()


def from_folders(reader, splits: list[tuple[str, Path]]) -> Splits:
    for name, folder in splits:
        if not folder.exists():
            raise SplitError(f"the folder of split {name!r} does not exist: {folder}")
    return _under(reader, splits, stored=False)


def from_stored_folders(reader, splits: list[tuple[str, str]]) -> Splits:
    """Splits as folders the index stores paths under (absolute, resolved: a server's request), matched
    against the stored paths only; no file is opened or resolved."""
    return _under(reader, splits, stored=True)


def _under(reader, splits: list[tuple[str, Path]] | list[tuple[str, str]], stored: bool) -> Splits:
    members: dict[str, list[np.ndarray]] = {}
    for name, folder in splits:
        members.setdefault(name, []).append(reader.ids_under(folder, stored=stored))
    return _checked(Splits({name: np.unique(np.concatenate(parts)) for name, parts in members.items()}))


def from_csv(reader, path: Path) -> Splits:
    """A CSV with a `split` column and a `path` or `sop_instance_uid` column (header row)."""
    rows, header, key = read_keyed_csv(path, SplitError)
    if "split" not in header or key is None:
        raise SplitError(f"{path} needs a header row with a `split` column and a `path` or `sop_instance_uid` "
                         f"column; it has {sorted(header) or 'none'}")
    pairs = [(row[key].strip(), row[header["split"]].strip()) for row in rows if row.get(key) and row.get(header["split"])]
    hits, unmatched = matched(reader, path, header, key, pairs)
    members: dict[str, set[int]] = {}
    for ids, split in hits:
        members.setdefault(split, set()).update(ids)
    result = Splits({name: np.asarray(sorted(ids), np.int64) for name, ids in members.items()}, unmatched)
    if unmatched:
        result.notes.append(f"{unmatched} rows of {path.name} name nothing in the index")
    return _checked(result)


def from_field(reader, name: str) -> Splits:
    if name not in SPLIT_FIELDS:
        raise SplitError(f"--split-by takes one of {', '.join(SPLIT_FIELDS)}, not {name!r}")
    columns = reader.columns([name])
    members: dict[str, list[int]] = {}
    for row_id, value in zip(columns["id"], columns[name]):
        if value is not None and str(value) != "":
            members.setdefault(str(value), []).append(int(row_id))
    return _checked(Splits({k: np.asarray(v, np.int64) for k, v in sorted(members.items())}))


def _checked(splits: Splits) -> Splits:
    if len(splits.members) < 2:
        raise SplitError(f"leakage needs at least two splits with images in the index; found "
                         f"{', '.join(f'{k} ({len(v)})' for k, v in splits.members.items()) or 'none'}")
    splits.notes += [f"split {name!r} has no image in the index" for name, ids in splits.members.items() if not len(ids)]
    return splits
