"""Zero-shot label probabilities from image and text embeddings, CLIP style.

Single-label (default): softmax over the labels of `logit_scale * cosine(image, label)`, the
model's own contrastive objective, so the probabilities of one image sum to 1.

Multi-label (`multilabel=True`): each label on its own, as a two-way softmax between the label
and its negation "no <label>": sigmoid(logit_scale * (cos(image, label) - cos(image, no label))).
A plain sigmoid of `logit_scale * cosine` would be ~1 for every label (the model has no bias
term), so the negation gives each label its own zero point.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import QueryError

NEGATION_TEMPLATE = "no {}"


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """"normal, pneumonia" or ["normal", "pneumonia"] -> ["normal", "pneumonia"]; at least two
    distinct labels for a softmax. Raises QueryError."""
    if isinstance(labels, str):
        labels = labels.split(",")
    parsed = [label.strip() for label in labels if label.strip()]
    if len(parsed) != len(set(parsed)):
        raise QueryError(f"repeated label in {parsed}")
    if not parsed:
        raise QueryError('no labels given; pass them comma-separated, e.g. "normal,pneumonia"', option="labels")
    return parsed


def softmax_probabilities(image_vectors: np.ndarray, label_vectors: np.ndarray,
                          logit_scale: float) -> np.ndarray:
    """(N, D) images x (L, D) labels -> (N, L) probabilities, each row summing to 1."""
    logits = logit_scale * (np.asarray(image_vectors, np.float64) @ np.asarray(label_vectors, np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)  # stable exp
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def contrast_probabilities(image_vectors: np.ndarray, label_vectors: np.ndarray,
                           negation_vectors: np.ndarray, logit_scale: float) -> np.ndarray:
    """(N, D) images x (L, D) labels and their (L, D) negations -> (N, L) independent probabilities."""
    images = np.asarray(image_vectors, np.float64)
    margin = images @ np.asarray(label_vectors, np.float64).T - images @ np.asarray(negation_vectors, np.float64).T
    return 1.0 / (1.0 + np.exp(-logit_scale * margin))
