"""k-reciprocal re-ranking (Zhong et al., CVPR 2017, without its local query expansion).

A candidate is a better hit when the query is also among the candidate's own nearest archive images, and when the
two share neighbours. Each query keeps its k-reciprocal set R(q): candidates among its top ``k1`` that would rank
the query within their own top ``k1``. Each candidate c has its top ``k1`` archive neighbours N(c). Both become
weighted sets, weight exp(-d / s) with s the median distance within the query's neighbour lists (so the weights
mean the same for L1 histograms and unit vectors); the weighted Jaccard distance between R(q) and N(c) is blended
with the original distance (normalised by the query's farthest candidate): d = (1 - lambda) d_J + lambda d / d_max.
Everything is per query: a query's result never depends on the batch it came in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from cbmir.errors import InvalidInputError

MAX_K1 = 100
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ReciprocalRerank:
    """k-reciprocal re-ranking of each query's candidates; ``k1`` neighbours per set, ``blend`` is lambda."""

    k1: int = 20
    blend: float = 0.3

    def __post_init__(self) -> None:
        if not 2 <= self.k1 <= MAX_K1:
            raise InvalidInputError(f"k-reciprocal re-ranking takes k1 in 2..{MAX_K1}, got {self.k1}")
        if not 0.0 <= self.blend <= 1.0:
            raise InvalidInputError(f"k-reciprocal blend (lambda) must be within [0, 1], got {self.blend}")


def reciprocal_distances(
    candidates: np.ndarray,
    distances: np.ndarray,
    neighbours: np.ndarray,
    neighbour_distances: np.ndarray,
    k1: int,
    blend: float,
) -> np.ndarray:
    """Re-ranking distance of each query to each of its candidates.

    Args:
        candidates: (Q, K) int64 candidate rows of each query, best first; -1 marks an empty slot.
        distances: (Q, K) query-to-candidate distances (+inf for empty slots).
        neighbours: (Q, K, k1) int64 archive rows nearest to each candidate (itself included), best first.
        neighbour_distances: (Q, K, k1) their distances to the candidate (+inf for empty slots).
        k1: size of the reciprocal and neighbour sets.
        blend: weight of the original distance (lambda).

    Returns:
        (Q, K) float32; +inf for empty slots.
    """
    q, k = candidates.shape
    valid = candidates >= 0
    has_neighbour = neighbours >= 0
    kth = neighbour_distances[:, :, min(k1, neighbours.shape[2]) - 1]
    top = np.arange(k) < k1
    reciprocal = valid & top[None, :] & (distances <= kth)
    positive = has_neighbour & (neighbour_distances > 0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a query without positive distances: scale 1
        scale = np.nanmedian(np.where(positive, neighbour_distances, np.nan).reshape(q, -1), axis=1)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)[:, None]
    query_weights = np.where(reciprocal, np.exp(-np.where(valid, distances, 0.0) / scale), 0.0)
    neighbour_weights = np.where(
        has_neighbour, np.exp(-np.where(has_neighbour, neighbour_distances, 0.0) / scale[:, :, None]), 0.0
    )
    inter = np.zeros((q, k), np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * k * neighbours.shape[2]))
    for start in range(0, q, step):
        sl = slice(start, start + step)
        same = neighbours[sl, :, :, None] == np.where(reciprocal[sl], candidates[sl], -2)[:, None, None, :]
        pair_min = np.minimum(neighbour_weights[sl, :, :, None], query_weights[sl, None, None, :])
        inter[sl] = np.where(same, pair_min, 0.0).sum(axis=(2, 3))
    union = query_weights.sum(axis=1, keepdims=True) + neighbour_weights.sum(axis=2) - inter
    jaccard = 1.0 - np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    finite = np.where(valid, distances, 0.0)
    farthest = np.maximum(finite.max(axis=1, keepdims=True), 1e-12)
    blended = (1.0 - blend) * jaccard + blend * finite / farthest
    return np.where(valid, blended, np.inf).astype(np.float32)
