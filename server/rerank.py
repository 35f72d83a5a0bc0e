"""Exact distances between each query and its own candidate rows: the re-ranker's kernel."""

from __future__ import annotations

import numpy as np

_CHUNK_ELEMENTS = 1 << 24


def candidate_distances(
    queries: np.ndarray, descriptors: np.ndarray, candidates: np.ndarray, metric: str
) -> np.ndarray:
    """Distance from each query to each of its candidates.

    Args:
        queries: (Q, D) float32.
        descriptors: (N, D) float32 archive descriptors.
        candidates: (Q, K) int64 rows into ``descriptors``; -1 marks an empty slot.
        metric: ``l1`` (sum of absolute differences), ``l2`` (Euclidean) or ``cosine`` (1 - inner product,
            for L2-normalised rows).

    Returns:
        (Q, K) float32; empty slots are +inf.
    """
    q, k = candidates.shape
    out = np.empty((q, k), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * descriptors.shape[1]))
    for start in range(0, q, step):
        cand = candidates[start : start + step]
        gathered = descriptors[np.maximum(cand, 0)]  # (q', K, D)
        diff_base = queries[start : start + step, None, :]
        if metric == "l1":
            d = np.abs(gathered - diff_base).sum(axis=-1)
        elif metric == "l2":
            d = np.sqrt(np.square(gathered - diff_base).sum(axis=-1))
        elif metric == "cosine":
            d = 1.0 - np.einsum("qkd,qd->qk", gathered, queries[start : start + step])
        else:
            raise ValueError(f"unknown metric {metric!r}")
        out[start : start + step] = np.where(cand >= 0, d, np.inf)
    return out
