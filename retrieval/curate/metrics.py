"""Ranking metrics of the evaluation, exact and dependency-free: ROC AUC from ranks (the
Mann-Whitney statistic, ties counted half) and average precision of a ranked relevance list."""
from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """The probability that a random positive scores above a random negative (ties: 1/2), from
    the ranks of the scores: O(n log n). None when either class is empty (AUC undefined)."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # average rank (1-based) of each run of tied scores
    starts = np.r_[0, np.nonzero(np.diff(ranked))[0] + 1]
    ends = np.r_[starts[1:], len(ranked)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(relevant_in_rank_order: np.ndarray) -> np.ndarray:
    """(Q, M) relevance (bool) of each query's candidates, best first -> (Q,) average precision:
    the mean, over the relevant candidates, of the precision at the rank of each; NaN for a query
    without any relevant candidate."""
    rel = np.asarray(relevant_in_rank_order, bool)
    hits = np.cumsum(rel, axis=1, dtype=np.int32)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    total = rel.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (np.where(rel, hits / ranks, 0.0)).sum(axis=1) / total, np.nan)
