"""Search on Milvus (``pymilvus``): the same engine, with the vectors and metadata in Milvus instead of this process.

The server keeps decoding, extraction and re-ranking and holds no index, so several ``cbmir serve --milvus``
replicas can stand behind one load balancer. Metadata filters and exclusions become boolean expressions with
escaped literals (:func:`~cbmir.search_backends.milvus_schema.filter_expression`). L1 methods (HOG) are searched
by L2 for ``L1_CANDIDATES x k`` candidates whose vectors come back with the hits and are re-ranked exactly by L1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from cbmir.errors import BackendUnavailableError, InvalidInputError
from cbmir.index_build.bundle import Bundle, MethodIndex

from .base import Allowed, RowSelection, SearchBackend, allowed_mask, drop_excluded, pad, to_true_distance
from .milvus_publish import published_collection
from .milvus_schema import L1_CANDIDATES, METRICS, filter_expression, index_params, metadata_fields

log = logging.getLogger(__name__)

MAX_TOPK = 16_384
"""Milvus' largest ``limit`` per search."""


class MilvusBackend(SearchBackend):
    """Searches the collections that ``cbmir publish`` wrote for exactly this bundle version.

    Args:
        bundle: the bundle being served (ids, metadata columns and extractors stay local).
        client: a connected ``MilvusClient``.
        uri: the URI it was connected with (for messages).
        prefix: collection prefix given to ``cbmir publish``.

    Raises:
        InvalidInputError: a collection is missing or holds another version, dimension or count.
    """

    name = "milvus"

    def __init__(self, bundle: Bundle, client: Any, uri: str, prefix: str = "cbmir") -> None:
        self.client = client
        self.uri = uri
        self.fields = metadata_fields(bundle.metadata)
        self.count = len(bundle)
        self.collections = {m: published_collection(client, uri, prefix, bundle, m) for m in bundle.methods}
        for name in self.collections.values():
            client.load_collection(name)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # pymilvus: MilvusException, grpc errors, timeouts
            raise BackendUnavailableError(f"Milvus at {self.uri}: {what} failed ({type(exc).__name__}: {exc})") from exc

    def _expression(self, allowed: Allowed, exclude_rows: np.ndarray | None) -> str | None:
        """The filter expression of a selection; a bare mask becomes a row list (the shorter of in / not in)."""
        clauses = []
        if isinstance(allowed, RowSelection) and allowed.filters:
            clauses.append(filter_expression(allowed.filters, self.fields))
        elif (mask := allowed_mask(allowed)) is not None:
            rows = np.flatnonzero(mask)
            if len(rows) <= self.count // 2:
                clauses.append(f"row in [{', '.join(str(r) for r in rows.tolist())}]" if len(rows) else "row < 0")
            else:
                clauses.append(filter_expression({}, {}, np.flatnonzero(~mask).tolist()) or "row >= 0")
        if exclude_rows is not None and len(exclude_rows):
            clauses.append(filter_expression({}, {}, exclude_rows.tolist()))
        return " and ".join(f"({c})" for c in clauses if c) or None

    def knn(
        self,
        method: MethodIndex,
        queries: np.ndarray,
        k: int,
        allowed: Allowed,
        exclude: Sequence[np.ndarray] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if k > MAX_TOPK:
            raise InvalidInputError(f"Milvus returns at most {MAX_TOPK} hits per query, {k} were asked for")
        mask = allowed_mask(allowed)
        if mask is not None and not mask.any():
            return np.full((len(queries), k), -1, np.int64), np.full((len(queries), k), np.inf, np.float32)
        groups: list[tuple[list[int], np.ndarray | None]]
        if exclude is not None and any(len(e) for e in exclude):
            groups = [([i], np.asarray(exclude[i])) for i in range(len(queries))]
        else:
            groups = [(list(range(len(queries))), None)]
        rows = np.full((len(queries), k), -1, np.int64)
        dist = np.full((len(queries), k), np.inf, np.float32)
        for members, excluded in groups:
            r, d = self._search(method, queries[members], k, self._expression(allowed, excluded))
            rows[members], dist[members] = r, d
        return rows, dist

    def _search(self, method: MethodIndex, q: np.ndarray, k: int, expr: str | None) -> tuple[np.ndarray, np.ndarray]:
        _, _, search = index_params(method.index_type, method.info.get("index_params", {}), self.count)
        l1 = method.metric == "l1"
        limit = min(MAX_TOPK, self.count, max(500, L1_CANDIDATES * k) if l1 else k)
        hits = self._call(
            "search",
            self.client.search,
            self.collections[method.name],
            data=q.tolist(),
            limit=limit,
            filter=expr or "",
            anns_field="vector",
            search_params={"metric_type": METRICS[method.metric], "params": search},
            output_fields=["vector"] if l1 else [],
        )
        rows = np.full((len(q), limit), -1, np.int64)
        scores = np.full((len(q), limit), np.inf, np.float32)
        vectors = np.zeros((len(q), limit, method.dim), np.float32) if l1 else None
        for i, per_query in enumerate(hits):
            for j, hit in enumerate(per_query):
                rows[i, j] = int(hit["row"])
                scores[i, j] = float(hit["distance"])
                if vectors is not None:
                    vectors[i, j] = hit["entity"]["vector"]
        if vectors is not None:
            exact = np.abs(vectors - q[:, None, :]).sum(axis=-1)
            exact[rows < 0] = np.inf
            order = np.argsort(exact, axis=1, kind="stable")[:, :k]
            return pad(np.take_along_axis(rows, order, 1), k, -1), pad(np.take_along_axis(exact, order, 1), k, np.inf)
        if method.metric == "l2":
            dist = np.sqrt(np.maximum(scores, 0.0))  # Milvus' L2 is the squared distance
        else:
            dist = to_true_distance(scores, method.metric)
        dist[rows < 0] = np.inf
        return drop_excluded(rows, dist.astype(np.float32), None, k)

    def vectors(self, method: MethodIndex, rows: np.ndarray) -> np.ndarray:
        """The vectors Milvus stores for ``rows`` (re-ranking never reads the bundle's copy)."""
        if not len(rows):
            return np.zeros((0, method.dim), np.float32)
        got = self._call(
            "get", self.client.get, self.collections[method.name], ids=[int(r) for r in rows], output_fields=["vector"]
        )
        by_row = {int(g["row"]): g["vector"] for g in got}
        return np.asarray([by_row[int(r)] for r in rows], dtype=np.float32)
