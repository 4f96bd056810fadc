"""How well the index's embeddings separate labelled images (`mi evaluate`):

- retrieval: each labelled image queries the other labelled images; precision@k and average
  precision (over the whole ranking) per label, for the queries that carry the label;
- kNN classification: each image's labels predicted from its k nearest labelled images, scored
  per label by the share of those neighbours that carry it: accuracy (the top label is one of
  the image's) and AUC per label (macro: their mean);
- zero-shot (optional): each label's prompt through the text tower, softmax over the labels with
  the model's logit scale (retrieval.labels), AUC per label and top-1 accuracy.

Neighbours never include the query itself, frames of its own file, images of its own patient
(pseudonym) or of its own study: those would flatter the embeddings (the same patient looks
alike whatever the label). Similarities are exact (float32 GEMM over the labelled vectors, in
blocks of queries, so memory holds one block of Q x labelled scores)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .labelled import Labels
from .metrics import average_precision, roc_auc

BLOCK_CELLS = 20_000_000   # scores per block of queries (80 MB of float32)


def evaluate(reader, labels: Labels, *, k: int = 10, max_queries: int | None = None, seed: int = 0,
             zero_shot: Callable[[list[str]], tuple[np.ndarray, float]] | None = None,
             prompt: str = "{label}") -> dict[str, Any]:
    """The report. `zero_shot(texts) -> ((T, D) unit vectors, logit scale)` encodes prompts (the
    text tower); `prompt` has `{label}` where the label goes. `max_queries`: a seeded sample of
    the labelled images queries (all of them are candidates)."""
    generation = reader.generation()
    ids, matrix, names = labels.ids, labels.matrix, labels.names
    rows = reader.rows(ids.tolist())
    keep = np.asarray([int(i) in rows for i in ids], bool)          # removed since the labels were read
    ids, matrix = ids[keep], matrix[keep]
    vectors = reader.vectors(ids.tolist()).astype(np.float32)
    n = len(ids)
    fields = [rows[int(i)] for i in ids]
    patient = _codes([f.get("patient_hash") for f in fields])
    study = _codes([f.get("study_instance_uid") for f in fields])
    files = _codes([f.get("path") for f in fields])
    queries = np.arange(n)
    if max_queries is not None and n > max_queries:
        queries = np.sort(np.random.default_rng(seed).choice(n, max_queries, replace=False))
    n_labels = len(names)
    k_eff = k
    hits_at_k = np.zeros((len(queries), n_labels))          # neighbours among the top k with each label
    found_k = np.zeros(len(queries), np.int64)
    sim_votes = np.zeros((len(queries), n_labels))
    ap = np.full((len(queries), n_labels), np.nan)
    block = max(1, BLOCK_CELLS // max(n, 1))
    for start in range(0, len(queries), block):
        q = queries[start:start + block]
        scores = vectors[q] @ vectors.T                      # (B, n)
        excluded = (files[None, :] == files[q][:, None])     # itself and its own file's frames
        excluded |= (patient[None, :] == patient[q][:, None]) & (patient[q][:, None] >= 0)
        excluded |= (study[None, :] == study[q][:, None]) & (study[q][:, None] >= 0)
        scores = np.where(excluded, -np.inf, scores)
        order = np.argsort(-scores, axis=1, kind="stable")
        ranked = np.take_along_axis(scores, order, axis=1)
        valid = np.isfinite(ranked)
        top, top_valid = order[:, :k], valid[:, :k]
        found_k[start:start + len(q)] = top_valid.sum(axis=1)
        top_labels = matrix[top] & top_valid[:, :, None]     # (B, k, L)
        hits_at_k[start:start + len(q)] = top_labels.sum(axis=1)
        sim_votes[start:start + len(q)] = (top_labels * np.where(top_valid, ranked[:, :k], 0.0)[:, :, None]).sum(1)
        for c in range(n_labels):
            has = matrix[q, c]
            if has.any():
                rel = matrix[order[has], c] & valid[has]
                ap[start:start + len(q)][has, c] = average_precision(rel)
    query_labels = matrix[queries]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = hits_at_k / np.maximum(found_k, 1)[:, None]  # kNN score of each label
    # predicted label: the most votes, ties to the larger summed similarity, then the first name
    predicted = np.lexsort((-np.arange(n_labels)[None, :].repeat(len(queries), 0), sim_votes, hits_at_k), axis=1)[:, -1]
    answered = found_k > 0
    correct = query_labels[np.arange(len(queries)), predicted] & answered
    per_label = []
    for c, name in enumerate(names):
        has = query_labels[:, c]
        per_label.append({
            "label": name, "images": int(matrix[:, c].sum()), "queries": int(has.sum()),
            "precision_at_k": _round(np.mean(share[has & answered, c]) if (has & answered).any() else None),
            "average_precision": _round(np.nanmean(ap[has, c]) if np.isfinite(ap[has, c]).any() else None),
            "knn_auc": _round(roc_auc(share[answered, c], has[answered])),
        })
    report: dict[str, Any] = {
        "index": str(reader.folder), "generation": generation, "labelled_images": int(n),
        "unmatched_rows": labels.unmatched, "notes": list(labels.notes), "labels": list(names), "k": k_eff,
        "queries": int(len(queries)), "sampled_queries": bool(len(queries) < n),
        "excluded_from_neighbours": ["the query itself", "frames of its file", "its patient", "its study"],
        "without_patient": int((patient < 0).sum()), "without_study": int((study < 0).sum()),
        "queries_without_neighbours": int((~answered).sum()),
        "retrieval": {"precision_at_k": _macro(per_label, "precision_at_k"),
                      "map": _macro(per_label, "average_precision")},
        "knn": {"accuracy": _round(correct[answered].mean() if answered.any() else None),
                "macro_auc": _macro(per_label, "knn_auc")},
        "zero_shot": None, "per_label": per_label,
    }
    if zero_shot is not None:
        report["zero_shot"] = _zero_shot(zero_shot, prompt, names, vectors, matrix, per_label)
    if reader.generation() != generation:
        from .neighbours import IndexChangedError
        raise IndexChangedError("mi-index changed the index while it was being checked: run the check again")
    return report


def prompts_of(template: str, names: list[str]) -> list[str]:
    return [template.replace("{label}", name) for name in names]


def _zero_shot(encode, template, names, vectors, matrix, per_label) -> dict[str, Any]:
    from ..labels import softmax_probabilities

    texts = prompts_of(template, names)
    label_vectors, logit_scale = encode(texts)
    if len(names) >= 2:
        scores = softmax_probabilities(vectors, label_vectors, logit_scale)
    else:  # one label: its cosine is its score
        scores = vectors.astype(np.float64) @ np.asarray(label_vectors, np.float64).T
    for c, entry in enumerate(per_label):
        entry["zero_shot_auc"] = _round(roc_auc(scores[:, c], matrix[:, c]))
    top = scores.argmax(axis=1)
    return {"prompt": template, "prompts": texts,
            "accuracy": _round(matrix[np.arange(len(top)), top].mean() if len(top) else None),
            "macro_auc": _macro(per_label, "zero_shot_auc")}


def _codes(values: list) -> np.ndarray:
    codes: dict = {}
    return np.asarray([codes.setdefault(v, len(codes)) if v else -1 for v in values], np.int64)


def _round(value: Any) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)


def _macro(per_label: list[dict[str, Any]], key: str) -> float | None:
    values = [e[key] for e in per_label if e.get(key) is not None]
    return round(float(np.mean(values)), 6) if values else None
