"""The default backend: the bundle's FAISS indices in this process (optionally copied to a GPU)."""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from cbmir.errors import BundleError
from cbmir.index_build.bundle import Bundle, MethodIndex
from cbmir.index_build.index_types import FAISS_METRICS

from .base import Allowed, SearchBackend, allowed_mask, drop_excluded, to_true_distance
from .faiss_gpu import gpu_copies, resolve_search_device


class FaissBackend(SearchBackend):
    """Exact flat search with bitmap selectors for filters; approximate indices scan the allowed rows exactly.

    Args:
        bundle: the loaded bundle whose indices are searched.
        search_device: ``cpu``, ``cuda`` (flat and IVF copies on the GPU for unfiltered searches) or ``auto``.
    """

    name = "faiss"

    def __init__(self, bundle: Bundle, search_device: str = "cpu") -> None:
        self.search_device = resolve_search_device(search_device)
        self._gpu = gpu_copies(bundle.methods) if self.search_device == "cuda" else None

    def knn(
        self,
        method: MethodIndex,
        queries: np.ndarray,
        k: int,
        allowed: Allowed,
        exclude: Sequence[np.ndarray] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if method.index is None:
            raise BundleError(f"method {method.name} was loaded without its FAISS index")
        n = method.index.ntotal
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        k_search = min(k + extra, n)
        if k_search == 0:
            return np.full((len(queries), k), -1, np.int64), np.full((len(queries), k), np.inf, np.float32)
        mask = allowed_mask(allowed)
        if mask is not None and method.index_type != "flat":
            raw, rows = _exact_subset_search(method, queries, k_search, np.flatnonzero(mask))
        else:
            params = None
            if mask is not None:
                bits = np.packbits(mask, bitorder="little")
                params = faiss.SearchParameters()
                params.sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            gpu_index = self._gpu.indexes.get(method.name) if self._gpu is not None and params is None else None
            raw, rows = (gpu_index or method.index).search(queries, k_search, params=params)
        dist = to_true_distance(raw, method.metric).astype(np.float32)
        return drop_excluded(rows, dist, exclude, k)


def _exact_subset_search(method: MethodIndex, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact search restricted to ``rows``: approximate indices lose hits under restrictive selectors."""
    if not len(rows):  # nothing allowed: no hits, on every index type
        return np.full((len(q), 1), np.inf, np.float32), np.full((len(q), 1), -1, np.int64)
    sub = faiss.IndexFlat(method.dim, FAISS_METRICS[method.metric])
    sub.add(np.ascontiguousarray(method.descriptors[rows], dtype=np.float32))
    raw, local = sub.search(q, min(k, len(rows)))
    return raw, np.where(local >= 0, rows[np.maximum(local, 0)], -1)
