"""Study-aware results: the ranked candidates -> what a researcher wants to see.

- Exact duplicates (the same SOP Instance UID, or the same file content: an uncompressed file
  and its lossless copy, a copied file) are one hit, best score first, with a count of the
  copies; `duplicates=True` shows each.
- `group="study"` or `"patient"`: one hit per study (Study Instance UID) or patient
  (pseudonym), its best image, with the number of matching images in the group. Images without
  the field are groups of their own.
- `exclude`: for an image query, drop hits of the query's own study or patient, to look for
  *other* cases.
- `fold_near`: a hit whose vector has cosine >= fold_near with a better hit of the same study
  (the same chest film in three transfer syntaxes, the frames of one cine) is folded into that
  hit, counted in its copies. Never across studies: near copies of different studies stay apart
  (a follow-up study is not a duplicate), nor for images without a Study Instance UID.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

GROUP_FIELDS = {"study": "study_instance_uid", "patient": "patient_hash"}


@dataclass(frozen=True)
class Candidate:
    """One ranked row before collapsing: its score, id and stored fields."""

    score: float
    id: int
    row: dict[str, Any]
    vector: Any = field(default=None, compare=False)  # its unit vector (fold_near); None: never folded by it


@dataclass
class Collapsed:
    """A hit after collapsing: the best candidate and how many it stands for."""

    best: Candidate
    copies: int = 1      # exact duplicates folded into it (itself included)
    in_group: int = 1    # images of its study or patient among the candidates (with `group`)


def duplicate_key(row: dict[str, Any]) -> tuple[str, str]:
    if row.get("sop_instance_uid"):
        return ("sop", f"{row['sop_instance_uid']}#{row.get('frame') or 0}")
    return ("content", f"{row.get('content_hash')}#{row.get('frame') or 0}")


def collapse(candidates: Sequence[Candidate], *, duplicates: bool = False, group: str | None = None,
             exclude: dict[str, Iterable[str]] | None = None, fold_near: float | None = None) -> list[Collapsed]:
    """Candidates (best first) -> collapsed hits, best first. `exclude`: {field: values} to drop;
    `fold_near`: a cosine (the candidates carry their vectors) above which a candidate of a kept
    hit's study is one of its copies."""
    if group is not None and group not in GROUP_FIELDS:
        raise ValueError(f"group must be one of {sorted(GROUP_FIELDS)}, not {group!r}")
    excluded = {field: set(values) for field, values in (exclude or {}).items()}
    out: list[Collapsed] = []
    by_copy: dict[tuple[str, str], Collapsed] = {}
    by_group: dict[str, Collapsed] = {}
    by_study: dict[str, list[Collapsed]] = {}   # fold_near: the kept hits of each study
    for candidate in candidates:
        row = candidate.row
        if any(row.get(field) in values for field, values in excluded.items()):
            continue
        if not duplicates:
            key = duplicate_key(row)
            if key in by_copy:
                by_copy[key].copies += 1
                continue
        if group is not None and row.get(GROUP_FIELDS[group]):
            member = by_group.get(row[GROUP_FIELDS[group]])
            if member is not None:
                member.in_group += 1
                if not duplicates:
                    by_copy[duplicate_key(row)] = member
                continue
        study = row.get("study_instance_uid") if fold_near is not None and candidate.vector is not None else None
        near = _near_copy_of(candidate, by_study.get(study, ()), fold_near) if study else None
        if near is not None:
            near.copies += 1
            if not duplicates:
                by_copy[duplicate_key(row)] = near
            continue
        hit = Collapsed(candidate)
        out.append(hit)
        if not duplicates:
            by_copy[duplicate_key(row)] = hit
        if group is not None and row.get(GROUP_FIELDS[group]):
            by_group[row[GROUP_FIELDS[group]]] = hit
        if study:
            by_study.setdefault(study, []).append(hit)
    return out


def _near_copy_of(candidate: Candidate, kept: Iterable[Collapsed], threshold: float | None) -> Collapsed | None:
    """The first kept hit whose vector has cosine >= threshold with the candidate's."""
    for hit in kept:
        if hit.best.vector is not None and float(hit.best.vector @ candidate.vector) >= threshold:
            return hit
    return None
