"""Retrieval metrics over ranked relevance matrices.

``relevant`` is a (Q, K) boolean matrix: entry (i, j) says whether the j-th hit of query i is relevant
(empty slots are False). Definitions follow the reference paper: P@k = relevant in the top k / k, mP@k its
mean over queries, and the paper's "mAP" = mean over queries of the average of P@1..P@K. Standard AP@K is
``sum_k P@k * rel_k / min(R, K)`` with R the number of relevant archive items for the query.
"""

from __future__ import annotations

import numpy as np


def precision_at_k(relevant: np.ndarray) -> np.ndarray:
    """P@k for k = 1..K per query: (Q, K) bool -> (Q, K) float64."""
    rel = np.asarray(relevant, dtype=np.float64)
    return np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)


def mean_precision_at_k(relevant: np.ndarray) -> np.ndarray:
    """mP@k for k = 1..K: (Q, K) bool -> (K,)."""
    return precision_at_k(relevant).mean(axis=0)


def seed_map(relevant: np.ndarray) -> float:
    """The reference paper's mAP: mean over queries of mean(P@1..P@K)."""
    return float(precision_at_k(relevant).mean())


def average_precision_at_k(relevant: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Standard AP@K per query; NaN where the archive holds no relevant item for the query.

    Args:
        relevant: (Q, K) bool.
        n_relevant: (Q,) number of relevant archive items per query (after exclusions).
    """
    rel = np.asarray(relevant, dtype=np.float64)
    k = rel.shape[1]
    denom = np.minimum(np.asarray(n_relevant, dtype=np.float64), k)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision_at_k(relevant) * rel).sum(axis=1) / denom
    return np.where(denom > 0, ap, np.nan)
