"""Study queries: several images of one study (views, slices) searched at once, their rankings fused."""

from __future__ import annotations

import numpy as np

from cbmir.search_backends import Allowed

from .search_engine import SearchEngine

FUSIONS = ("rrf", "min")
RRF_K = 60
"""Reciprocal-rank fusion constant (Cormack et al. 2009)."""


def fused_search(
    engine: SearchEngine,
    method: str,
    queries: np.ndarray,
    k: int,
    fusion: str = "rrf",
    *,
    allowed: Allowed = None,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One ranking for S query images of one study.

    ``min``: each archive image at its smallest distance to any query image; exact from each query's top k.
    ``rrf``: ordered by the sum of 1 / (60 + rank) over the queries' rankings (each cut at max(5k, 50)); the
    distance reported is still the smallest one.

    Args:
        queries: (S, dim) descriptors of the study's images for ``method``.

    Returns:
        (rows, distances), each (<= k,), best first, ties broken by row.
    """
    depth = k if fusion == "min" else max(5 * k, 50)
    ex = [exclude if exclude is not None else np.zeros(0, np.int64)] * len(queries)
    result = engine.search(method, queries, min(depth, len(engine.bundle)), allowed=allowed, exclude=ex)
    rows, dists = result.rows, result.distances
    valid = rows >= 0
    flat_rows, flat_d = rows[valid], dists[valid]
    if not len(flat_rows):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    uniq, inverse = np.unique(flat_rows, return_inverse=True)
    best = np.full(len(uniq), np.inf, np.float32)
    np.minimum.at(best, inverse, flat_d)
    if fusion == "min":
        order = np.lexsort((uniq, best))
    else:
        ranks = np.broadcast_to(np.arange(1, rows.shape[1] + 1), rows.shape)[valid]
        score = np.zeros(len(uniq), np.float64)
        np.add.at(score, inverse, 1.0 / (RRF_K + ranks))
        order = np.lexsort((uniq, best, -score))
    order = order[:k]
    return uniq[order].astype(np.int64), best[order]
