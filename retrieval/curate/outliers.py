"""Outliers: images unlike their group (folder, modality, body part or view) and images unlike
anything in the index, ranked by a robust z-score (distance from the median in units of the
median absolute deviation), each with its reason and nearest neighbours.

- Unlike anything: the mean similarity to its k nearest images of other files, against the
  index's median of that mean.
- Unlike its group: the similarity to its group's mean direction (centroid), against the
  group's median. Groups smaller than MIN_GROUP are not judged (no reliable median)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .neighbours import DEFAULT_K, DEFAULT_NPROBE, scan

GROUPINGS = {"folder": "path", "modality": "modality", "body_part": "body_part", "view": "view_position"}
MIN_GROUP = 5
MAD_FLOOR = 0.01   # cosine spread below this is noise: a tight group must not make 0.02 a 50-MAD outlier


def robust_z(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(how far below the median each value lies, in MADs; the median; the MAD)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return np.zeros_like(values, np.float64), float("nan"), float("nan")
    median = float(np.median(finite))
    mad = max(float(np.median(np.abs(finite - median))) * 1.4826, MAD_FLOOR)
    z = (median - values) / mad
    return np.where(np.isfinite(values), z, 0.0), median, mad


def find_outliers(reader, *, by: str | None = None, k: int = DEFAULT_K, top: int = 20,
                  nprobe: int | None = DEFAULT_NPROBE) -> dict[str, Any]:
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"by must be one of {sorted(GROUPINGS)}")
    generation = reader.generation()
    found = scan(reader, threshold=1.1, k=k, nprobe=nprobe)   # no pairs: neighbours only
    ids = found.ids
    z_global, median_global, _ = robust_z(found.mean_k.astype(np.float64))
    z_group = np.zeros(len(ids))
    group_of: list[Any] = [None] * len(ids)
    group_similarity = np.full(len(ids), np.nan)
    group_median: dict[Any, float] = {}
    if by is not None:
        column = GROUPINGS[by]
        values = reader.columns([column])[column]
        group_of = [os.path.dirname(v) if column == "path" else (v.upper() if isinstance(v, str) else v)
                    for v in values]
        codes: dict[Any, int] = {}
        code = np.asarray([codes.setdefault(g, len(codes)) for g in group_of], np.int64)
        sums = np.zeros((len(codes), reader.dim), np.float64)
        for batch_ids, vectors in reader.batches():          # centroids in one streaming pass
            np.add.at(sums, code[np.searchsorted(ids, batch_ids)], vectors)
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        for batch_ids, vectors in reader.batches():
            at = np.searchsorted(ids, batch_ids)
            group_similarity[at] = np.einsum("nd,nd->n", vectors, centroids[code[at]])
        sizes = np.bincount(code, minlength=len(codes))
        for g, c in codes.items():
            members = np.nonzero(code == c)[0]
            if sizes[c] >= MIN_GROUP and g is not None:
                z, median, _ = robust_z(group_similarity[members])
                z_group[members] = z
                group_median[g] = median
    score = np.maximum(z_global, z_group)
    order = np.argsort(-score, kind="stable")[:top]
    rows = reader.rows([int(ids[p]) for p in order] + [int(n) for p in order for n in found.neighbours[p][:3] if n >= 0])
    outliers = []
    for p in order:
        row_id = int(ids[p])
        if group_of[p] in group_median and z_group[p] > z_global[p]:  # judged in its group (never None)
            reason = (f"unlike its {by} {group_of[p]!s}: similarity {group_similarity[p]:.3f} to the group's "
                      f"centroid, group median {group_median[group_of[p]]:.3f}")
        else:
            reason = (f"unlike anything in the index: mean similarity {found.mean_k[p]:.3f} to its {k} nearest, "
                      f"index median {median_global:.3f}")
        outliers.append({"id": row_id, "path": rows[row_id]["path"], "frame": rows[row_id]["frame"],
                         "score": round(float(score[p]), 3), "reason": reason,
                         "group": None if by is None else group_of[p],
                         "mean_similarity": round(float(found.mean_k[p]), 6),
                         "group_similarity": None if np.isnan(group_similarity[p]) else
                         round(float(group_similarity[p]), 6),
                         "neighbours": [{"id": int(n), "path": rows[int(n)]["path"],}
                                        for n in found.neighbours[p][:3] if n >= 0 and int(n) in rows]})
    return {"index": str(reader.folder), "generation": generation, "images": int(len(ids)), "by": by, "k": k,
            "median_mean_similarity": round(median_global, 6), "outliers": outliers}
