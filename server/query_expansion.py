"""Average query expansion (alpha-QE, Radenović et al. 2018): the query moved towards its own best hits.

The expanded query is the weighted mean of the query and its top ``neighbours`` hits, weighted by similarity to
the power ``alpha`` (the query weighs 1). Similarity is the cosine when the descriptors are unit-length (``cosine``
metric, or ``l2`` over L2-normalised rows, where cos = 1 - d^2 / 2); other descriptors (HOG's L1 histograms)
get plain average expansion (every weight 1). Unit-length queries stay unit-length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbmir.errors import InvalidInputError

MAX_NEIGHBOURS = 50
DEFAULT_EXPANSION_ALPHA = 3.0
_UNIT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class QueryExpansion:
    """Expand each query with its top ``neighbours`` hits, weighted by similarity**alpha."""

    neighbours: int
    alpha: float = DEFAULT_EXPANSION_ALPHA

    def __post_init__(self) -> None:
        if not 1 <= self.neighbours <= MAX_NEIGHBOURS:
            raise InvalidInputError(f"query expansion takes 1..{MAX_NEIGHBOURS} neighbours, got {self.neighbours}")
        if not 0.0 <= self.alpha <= 100.0:
            raise InvalidInputError(f"query expansion alpha must be within [0, 100], got {self.alpha}")


def unit_length(vectors: np.ndarray) -> bool:
    """True when every row of (Q, D) ``vectors`` has norm 1 (within 1e-3)."""
    norms = np.linalg.norm(vectors, axis=1)
    return bool(len(norms)) and bool(np.all(np.abs(norms - 1.0) <= _UNIT_TOLERANCE))


def expand_queries(
    queries: np.ndarray,
    neighbour_vectors: np.ndarray,
    distances: np.ndarray,
    valid: np.ndarray,
    metric: str,
    alpha: float,
) -> np.ndarray:
    """Alpha-QE of each query.

    Args:
        queries: (Q, D) float32.
        neighbour_vectors: (Q, N, D) float32 vectors of each query's top hits.
        distances: (Q, N) distances of those hits under ``metric``.
        valid: (Q, N) bool, False for empty slots.
        metric: ``l1``, ``l2`` or ``cosine``.
        alpha: similarity exponent; 0 gives plain average expansion.

    Returns:
        (Q, D) float32 expanded queries.
    """
    cosine_weights = metric == "cosine" or (metric == "l2" and unit_length(queries))
    if cosine_weights:
        similarity = 1.0 - distances if metric == "cosine" else 1.0 - np.square(distances) / 2.0
        weights = np.clip(similarity, 0.0, 1.0) ** alpha
    else:
        weights = np.ones(distances.shape, np.float32)
    weights = np.where(valid, weights, 0.0).astype(np.float32)
    expanded = queries + np.einsum("qn,qnd->qd", weights, neighbour_vectors)
    if cosine_weights:
        norms = np.linalg.norm(expanded, axis=1, keepdims=True)
        return (expanded / np.maximum(norms, 1e-12)).astype(np.float32)
    return (expanded / (1.0 + weights.sum(axis=1, keepdims=True))).astype(np.float32)
