"""The search backend contract: k nearest archive rows of query descriptors, under filters and exclusions."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cbmir.index_build.bundle import MethodIndex


@dataclass(frozen=True)
class RowSelection:
    """Rows a search may return: the (N,) bool ``mask``, and the metadata ``filters`` (field -> allowed values,
    all fields must match) it came from, so a backend with its own metadata (Milvus) filters there."""

    mask: np.ndarray
    filters: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def __and__(self, other: RowSelection | np.ndarray) -> RowSelection:
        if isinstance(other, RowSelection):
            merged = dict(self.filters)
            for name, values in other.filters.items():
                merged[name] = merged[name] & values if name in merged else values
            return RowSelection(self.mask & other.mask, merged)
        return RowSelection(self.mask & np.asarray(other, dtype=bool), {})  # a bare mask: rows only


Allowed = RowSelection | np.ndarray | None
"""What a search may return: everything (None), a bare (N,) bool mask, or a :class:`RowSelection`."""


def allowed_mask(allowed: Allowed) -> np.ndarray | None:
    """The (N,) bool mask of an :data:`Allowed` value (None: every row)."""
    if allowed is None:
        return None
    return allowed.mask if isinstance(allowed, RowSelection) else np.asarray(allowed, dtype=bool)


class SearchBackend(abc.ABC):
    """Finds candidate rows; the engine turns them into hits (exclusions, re-ranking, shaping).

    A backend is registered in :data:`cbmir.search_backends.BACKENDS`; the FAISS backend (in-process, the default)
    and the Milvus backend (``pymilvus``: milvus-lite, standalone or cluster) implement it.
    """

    name: str = ""

    @abc.abstractmethod
    def knn(
        self,
        method: MethodIndex,
        queries: np.ndarray,
        k: int,
        allowed: Allowed,
        exclude: Sequence[np.ndarray] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows per query.

        Args:
            method: the method's index (metric, dim, index type, and for FAISS the index itself).
            queries: (Q, dim) float32.
            k: hits wanted per query.
            allowed: rows that may be returned.
            exclude: per query, rows never to return.

        Returns:
            (rows (Q, k) int64 with -1 for missing hits, true distances (Q, k) float32 with +inf there).
        """

    def vectors(self, method: MethodIndex, rows: np.ndarray) -> np.ndarray:
        """The stored descriptors (len(rows), dim) of ``rows`` (for exact re-ranking); the bundle's by default."""
        return np.asarray(method.descriptors[rows], dtype=np.float32)

    def close(self) -> None:
        """Release connections (no-op for in-process backends)."""


def to_true_distance(raw: np.ndarray, metric: str) -> np.ndarray:
    """Index scores -> true distances: sqrt of squared L2, ``1 - inner product`` for cosine, L1 as it is."""
    if metric == "l2":
        return np.sqrt(np.maximum(raw, 0.0))
    if metric == "cosine":
        return 1.0 - raw
    return raw


def drop_excluded(
    rows: np.ndarray, dist: np.ndarray, exclude: Sequence[np.ndarray] | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove excluded and missing rows from over-fetched (Q, k') hits, keeping order; pad to (Q, k)."""
    if exclude is not None and any(len(e) for e in exclude):
        drop = np.zeros(rows.shape, dtype=bool)
        for i, ex in enumerate(exclude):
            if len(ex):
                drop[i] = np.isin(rows[i], ex)
        drop |= rows < 0
        order = np.argsort(drop, axis=1, kind="stable")
        rows = np.take_along_axis(rows, order, axis=1)
        dist = np.take_along_axis(dist, order, axis=1)
        rows[np.take_along_axis(drop, order, axis=1)] = -1
    rows, dist = rows[:, :k], dist[:, :k].copy()
    dist[rows < 0] = np.inf
    return pad(rows, k, -1), pad(dist, k, np.inf)


def pad(a: np.ndarray, k: int, fill: float) -> np.ndarray:
    """``a`` (Q, k') widened to (Q, k) with ``fill``."""
    if a.shape[1] >= k:
        return a
    return np.concatenate([a, np.full((a.shape[0], k - a.shape[1]), fill, dtype=a.dtype)], axis=1)
