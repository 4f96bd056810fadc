"""Duplicate clusters: exact duplicates (the same SOP Instance UID and frame, or files with the
same bytes) and near duplicates (cosine similarity at or above a threshold), each cluster with
how its members relate (same content, study, series, patient pseudonym; different transfer
syntax or size; with `pixels`, the same decoded pixels).

The threshold depends on the model's weights: the report carries the distribution of every
image's similarity to its nearest other image, so a threshold can be chosen from the data."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import files as file_facts
from .neighbours import DEFAULT_K, DEFAULT_NPROBE, Scan, UnionFind, histogram, quantiles, scan

# A starting point, not a measurement on the published weights (none were at hand where this was
# written): a lossless re-encoding decodes to the same pixels and so gives cosine 1.0 with any
# weights; how far lossy copies and other images of one patient fall depends on the weights.
# Read the nearest-neighbour distribution the report prints and set --threshold from it.
DEFAULT_THRESHOLD = 0.98
THRESHOLD_NOTE = ("similarity thresholds depend on the model's weights: choose one from the distribution of "
                  "nearest-neighbour similarities above (--threshold)")
MAX_FILES_READ = 20_000  # file headers / pixels read per report for the relations (bounded time)


def find_duplicates(reader, *, threshold: float = DEFAULT_THRESHOLD, k: int = DEFAULT_K, near: bool = True,
                    pixels: bool = False, nprobe: int | None = DEFAULT_NPROBE, found: Scan | None = None
                    ) -> dict[str, Any]:
    """The duplicate report of an index (an open IndexReader): clusters, largest first, and the
    nearest-neighbour similarity distribution. `near=False`: exact duplicates only (no vectors)."""
    generation = reader.generation()
    exact = reader.exact_groups()
    if near and found is None:
        found = scan(reader, threshold=threshold, k=k, nprobe=nprobe)
    ids = found.ids if found is not None else reader.ids()
    sets = UnionFind(len(ids))
    linked: list[np.ndarray] = []
    for _kind, members in exact:
        at = np.searchsorted(ids, members)
        for other in at[1:]:
            sets.union(int(at[0]), int(other))
        linked.append(at)
    if found is not None and len(found.pairs):
        at = np.searchsorted(ids, found.pairs)
        for a, b in at:
            sets.union(int(a), int(b))
        linked.append(at.ravel())
    groups = sets.groups(np.concatenate(linked)) if linked else []
    budget = [MAX_FILES_READ]
    clusters = [_describe(reader, [int(ids[p]) for p in group], pixels, budget) for group in groups]
    for number, cluster in enumerate(clusters, start=1):
        cluster["cluster"] = number
    report: dict[str, Any] = {
        "index": str(reader.folder), "generation": generation, "images": int(len(ids)),
        "threshold": threshold if near else None, "k": k if near else None,
        "faiss_index": found.kind if found is not None else None,
        "summary": {"clusters": len(clusters),
                    "exact_clusters": sum(c["kind"] == "exact" for c in clusters),
                    "near_clusters": sum(c["kind"] == "near" for c in clusters),
                    "mixed_clusters": sum(c["kind"] == "mixed" for c in clusters),
                    "images_in_clusters": sum(c["size"] for c in clusters),
                    "redundant_images": sum(c["size"] - 1 for c in clusters)},
        "clusters": [{"cluster": c.pop("cluster"), **c} for c in clusters],
    }
    if found is not None:
        report["nearest_similarity"] = {"quantiles": quantiles(found.nearest), "histogram": histogram(found.nearest),
                                        "note": THRESHOLD_NOTE}
    return report


def _kind(members: list[dict[str, Any]], pixels: bool) -> str:
    """"exact" when every member is a copy of every other (one file content, one SOP Instance
    UID and frame, or with `pixels` one decoded pixel array), "near" when no two are copies,
    "mixed" otherwise."""
    groups = [g for g in ("content_group", "sop_group", "pixel_group") if pixels or g != "pixel_group"]
    if any(all(m.get(g) == 1 for m in members) for g in groups):
        return "exact"
    copies = any(len({m[g] for m in members if m.get(g) is not None}) < sum(m.get(g) is not None for m in members)
                 for g in groups)
    return "mixed" if copies else "near"


def _describe(reader, member_ids: list[int], pixels: bool, budget: list[int]) -> dict[str, Any]:
    rows = reader.rows(member_ids)
    member_ids = [i for i in member_ids if i in rows]
    vectors = reader.vectors(member_ids)
    similarity = vectors @ vectors[0]
    members = []
    for row_id, score in zip(member_ids, similarity):
        row = rows[row_id]
        member = {"id": row_id, "path": row["path"], "frame": row["frame"],
                  "similarity": round(float(np.clip(score, -1.0, 1.0)), 6),
                  "sop_instance_uid": row.get("sop_instance_uid"),
                  "study_instance_uid": row.get("study_instance_uid"),
                  "series_instance_uid": row.get("series_instance_uid"),
                  "patient": row.get("patient_hash"), "modality": row.get("modality"),
                  "width": row.get("width"), "height": row.get("height"),
                  "source_format": row.get("source_format"), "content_hash": row.get("content_hash"),
                  "transfer_syntax": None}
        if budget[0] > 0:
            budget[0] -= 1
            member["transfer_syntax"] = file_facts.syntax_name(file_facts.transfer_syntax(row["path"]))
            if pixels:
                member["pixel_digest"] = file_facts.pixel_digest(row["path"], int(row["frame"] or 0))
        members.append(member)
    relations = relations_of(members, pixels)
    kind = _kind(members, pixels)
    return {"kind": kind, "size": len(members), "relations": relations,
            "min_similarity": round(float(min(m["similarity"] for m in members)), 6), "members": members}


IDENTITIES = (("content_hash", "content_group", "file content", "file contents"),
              ("sop_key", "sop_group", "SOP Instance UID", "SOP Instance UIDs"),
              ("pixel_digest", "pixel_group", "decoded pixels", "decoded pixel arrays"))


def relations_of(members: list[dict[str, Any]], pixels: bool = False) -> list[str]:
    """How a cluster's members relate, in words: what they all share, how many distinct file
    contents, SOP Instance UIDs (and decoded pixel arrays) they are, and what differs. Numbers
    each member's copy groups (`content_group`, `sop_group`, `pixel_group`: 1, 2, ... in order
    of appearance) so that a reader sees which members are copies of which."""
    for m in members:
        m["sop_key"] = f"{m['sop_instance_uid']}#{m['frame']}" if m.get("sop_instance_uid") else None

    def values(field: str) -> list:
        return [m.get(field) for m in members]

    def same(field: str) -> bool:
        found = values(field)
        return all(v is not None for v in found) and len(set(found)) == 1

    relations = []
    for field, group, name, plural in IDENTITIES:
        if field == "pixel_digest" and not pixels:
            continue
        numbers: dict = {}
        for m in members:
            value = m.get(field)
            m[group] = numbers.setdefault(value, len(numbers) + 1) if value is not None else None
        known = [v for v in values(field) if v is not None]
        if same(field):
            relations.append(f"same {name}")
        elif len(known) == len(members) and len(numbers) < len(members):
            relations.append(f"{len(numbers)} distinct {plural}")
        elif len(known) == len(members):
            relations.append(f"different {plural}")
    for m in members:
        m.pop("sop_key")
    for field, name, plural in (("study_instance_uid", "study", "studies"), ("series_instance_uid", "series", "series"),
                                ("patient", "patient", "patients")):
        known = {v for v in values(field) if v is not None}
        if same(field):
            relations.append(f"same {name}")
        elif len(known) > 1:
            relations.append(f"{len(known)} {plural}")
    if len({(m.get("width"), m.get("height")) for m in members}) > 1:
        relations.append("different size")
    syntaxes = {m.get("transfer_syntax") for m in members} - {None}
    if len(syntaxes) > 1:
        relations.append("different transfer syntax")
    if len({m.get("source_format") for m in members}) > 1:
        relations.append("different file format")
    return relations
