"""Leakage between dataset splits: per pair of splits, the patients (by pseudonym) and studies
found in both, the exact duplicates (same SOP Instance UID and frame, same file bytes) and near
duplicates (cosine >= threshold) across them, and images placed in both. Nothing but what the
index stores is reported: patients appear as their pseudonyms, never as IDs."""
from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from .duplicates import DEFAULT_THRESHOLD
from .neighbours import DEFAULT_K, DEFAULT_NPROBE, scan
from .splits import Splits

CHECKS = ("same_images", "patients", "studies", "exact_duplicates", "near_duplicates")


def find_leakage(reader, splits: Splits, *, threshold: float | None = DEFAULT_THRESHOLD, k: int = DEFAULT_K,
                 nprobe: int | None = DEFAULT_NPROBE) -> dict[str, Any]:
    """The leakage report; `threshold=None` skips near duplicates (no vectors read)."""
    generation = reader.generation()
    columns = reader.columns(["patient_hash", "study_instance_uid"])
    ids = columns["id"]
    names = splits.names()
    member = np.zeros((len(names), len(ids)), bool)   # split x position
    for s, name in enumerate(names):
        member[s, np.searchsorted(ids, splits.members[name])] = True
    assigned = member.any(axis=0)
    patients = _codes(columns["patient_hash"])
    studies = _codes(columns["study_instance_uid"])
    exact_pairs = _exact_pairs(reader, ids)
    near = None
    if threshold is not None:
        near = scan(reader, threshold=threshold, k=k, nprobe=nprobe)
    report_pairs = []
    for a, b in combinations(range(len(names)), 2):
        in_a, in_b = member[a], member[b]
        entry: dict[str, Any] = {"splits": [names[a], names[b]]}
        both = np.nonzero(in_a & in_b)[0]
        entry["same_images"] = {"count": int(len(both)), "items": [{"id": int(ids[p])} for p in both]}
        entry["patients"] = _shared_keys(patients, columns["patient_hash"], in_a, in_b, ids, names[a], names[b],
                                         "patient")
        entry["studies"] = _shared_keys(studies, columns["study_instance_uid"], in_a, in_b, ids, names[a], names[b],
                                        "study_instance_uid")
        names_ab = (names[a], names[b])
        entry["exact_duplicates"] = _across(exact_pairs[0], exact_pairs[1], ids, in_a, in_b, names_ab, "relation")
        if near is not None:
            entry["near_duplicates"] = _across(near.pairs, near.pair_scores, ids, in_a, in_b, names_ab, "similarity")
        entry["leaks"] = any(entry[c]["count"] for c in CHECKS if c in entry)
        report_pairs.append(entry)
    if reader.generation() != generation:
        from .neighbours import IndexChangedError
        raise IndexChangedError("mi-index changed the index while it was being checked: run the check again")
    return {
        "index": str(reader.folder), "generation": generation, "images": int(len(ids)),
        "splits": {name: int(member[s].sum()) for s, name in enumerate(names)},
        "unassigned": int((~assigned).sum()), "unmatched_rows": splits.unmatched, "notes": list(splits.notes),
        "without_patient": int(((patients < 0) & assigned).sum()),
        "without_study": int(((studies < 0) & assigned).sum()),
        "threshold": threshold, "leakage": any(p["leaks"] for p in report_pairs), "pairs": report_pairs,
    }


def _codes(values: list) -> np.ndarray:
    codes: dict = {}
    return np.asarray([codes.setdefault(v, len(codes)) if v else -1 for v in values], np.int64)


def _shared_keys(codes, values, in_a, in_b, ids, name_a, name_b, key_name) -> dict[str, Any]:
    """The keys (patient pseudonyms, study UIDs) held by images of both splits, with those images."""
    known = codes >= 0
    shared = np.intersect1d(codes[in_a & known], codes[in_b & known])
    return {"count": int(len(shared)), "items": _grouped(codes, values, shared, in_a, in_b, ids, name_a, name_b,
                                                          key_name)}


def _grouped(codes, values, shared, in_a, in_b, ids, name_a, name_b, key_name) -> list[dict[str, Any]]:
    wanted = set(shared.tolist())
    found: dict[int, dict[str, Any]] = {}
    for p, code in enumerate(codes):
        if code in wanted:
            item = found.setdefault(int(code), {key_name: values[p], "images": {name_a: [], name_b: []}})
            if in_a[p]:
                item["images"][name_a].append(int(ids[p]))
            if in_b[p]:
                item["images"][name_b].append(int(ids[p]))
    return [found[int(c)] for c in shared]


def _exact_pairs(reader, ids) -> tuple[np.ndarray, list[str]]:
    """Every pair of exact duplicates (ids), with its relation."""
    pairs, relations = [], []
    for kind, members in reader.exact_groups():
        for i, j in combinations(members, 2):
            pairs.append((i, j))
            relations.append("same SOP Instance UID" if kind == "sop" else "same file content")
    return (np.asarray(pairs, np.int64).reshape(-1, 2), relations)


def _across(pairs, extra, ids, in_a, in_b, names_ab, extra_name) -> dict[str, Any]:
    """The pairs with one image in each split: {"ids": [i, j], "splits": [split of i, of j], extra}."""
    if not len(pairs):
        return {"count": 0, "items": []}
    at = np.searchsorted(ids, pairs)
    across = (in_a[at[:, 0]] & in_b[at[:, 1]]) | (in_b[at[:, 0]] & in_a[at[:, 1]])
    items = {}
    for row in np.nonzero(across)[0]:
        i, j = int(pairs[row, 0]), int(pairs[row, 1])
        value = extra[row]
        value = round(float(value), 6) if extra_name == "similarity" else value
        first_in_a = bool(in_a[at[row, 0]] and in_b[at[row, 1]])
        items.setdefault((i, j), {"ids": [i, j], "splits": list(names_ab if first_in_a else names_ab[::-1]),
                                  extra_name: value})
    return {"count": len(items), "items": list(items.values())}
