"""Exact k-NN search over a loaded bundle, with metadata filters, exclusions and re-ranking.

This is the one search implementation: the gRPC service and ``cbmir eval`` both call it, so online answers
equal offline ones. Distances are true distances of the method that ordered the hits: Euclidean (``l2``),
city-block (``l1``) or cosine distance ``1 - cos`` (``cosine``); smaller is closer everywhere.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cbmir.errors import BundleError, InvalidInputError, shown
from cbmir.extractors import Extractor
from cbmir.extractors.imaging import DEFAULT_MAX_PIXELS, decode_image
from cbmir.index_build.bundle import Bundle, MethodIndex
from cbmir.index_build.records import rows_by_value
from cbmir.search_backends import Allowed, FaissBackend, RowSelection, SearchBackend
from cbmir.search_backends.base import pad
from cbmir.timing import stage

from .query_expansion import QueryExpansion, expand_queries
from .reciprocal_rerank import ReciprocalRerank, reciprocal_distances
from .rerank import candidate_distances


@dataclass
class SearchResult:
    """Row indices (Q, k) int64, -1 where fewer than k hits exist, and their distances (Q, k) float32 (+inf)."""

    rows: np.ndarray
    distances: np.ndarray


def best_k(candidates: np.ndarray, distances: np.ndarray, k: int) -> SearchResult:
    """The k closest of each row's candidates (Q, K) by new ``distances`` (Q, K), ties kept in candidate order."""
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    rows = np.take_along_axis(candidates, order, axis=1)
    dist = np.take_along_axis(distances, order, axis=1)
    return SearchResult(pad(rows, k, -1), pad(dist, k, np.inf))


class SearchEngine:
    """Holds a bundle's indices and (lazily restored, then reused) extractors; answers batched queries."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        extractors: Mapping[str, Extractor] | None = None,
        *,
        runtime: str | None = None,
        precision: str | None = None,
        search_device: str = "cpu",
        backend: SearchBackend | None = None,
    ) -> None:
        """Args:
        bundle: the loaded bundle.
        device: where the extractors run.
        extractors: already restored extractors by method (reused as they are).
        runtime: cnn inference runtime; None or ``bundle``: the one the bundle was indexed with.
        precision: cnn precision; None: the bundle's.
        search_device: ``cpu``, ``cuda`` (FAISS GPU copies of flat and IVF indices) or ``auto``.
        backend: where k-NN runs (default: :class:`~cbmir.search_backends.FaissBackend` on ``search_device``).
        """
        self.bundle = bundle
        self.device = device
        self.runtime = runtime
        self.precision = precision
        self.backend = backend or FaissBackend(bundle, search_device)
        self.windows = bundle.dicom_windows
        self._extractors: dict[str, Extractor] = dict(extractors or {})
        self._lock = threading.Lock()
        self._values: dict[str, dict[str, np.ndarray]] = {}
        for field, column in bundle.metadata.items():
            self._values[field] = rows_by_value(column)

    @property
    def methods(self) -> list[str]:
        return list(self.bundle.methods)

    @property
    def filter_fields(self) -> list[str]:
        return sorted(self._values)

    def method(self, name: str) -> MethodIndex:
        """The named method's index, or InvalidInputError listing the available ones."""
        if name not in self.bundle.methods:
            raise InvalidInputError(f"unknown method {shown(name)}; this index has {', '.join(self.methods)}")
        return self.bundle.methods[name]

    def extractor(self, name: str) -> Extractor:
        """The method's extractor, restored from the bundle once and reused across requests."""
        ex = self._extractors.get(name)
        if ex is not None:
            return ex
        with self._lock:
            if name not in self._extractors:
                self._extractors[name] = self.method(name).restore_extractor(self.device, self.runtime, self.precision)
            return self._extractors[name]

    def warmup(self) -> None:
        """Restore every extractor and run it once; a configuration that cannot describe an image is refused.

        Raises:
            BundleError: naming the manifest field of the method that failed.
        """
        for name in self.methods:
            extractor = self.extractor(name)
            try:
                extractor.warmup()
            except Exception as exc:  # restored from the manifest, so the manifest is at fault
                raise BundleError(
                    f"{self.method(name).manifest_path}: field methods.{name}.config: the {extractor.name} extractor "
                    f"cannot describe an image ({type(exc).__name__}: {exc})"
                ) from exc

    def decode(self, data: bytes, *, source: str = "query image", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """A query image's bytes decoded as this bundle's archive was (its DICOM windows), 2-D float32 in [0, 1]."""
        return decode_image(data, source=source, max_pixels=max_pixels, windows=self.windows)

    def describe(self, name: str, images: Sequence[np.ndarray]) -> np.ndarray:
        """Searchable descriptors (Q, dim) of query images for one method."""
        return self.extractor(name).describe(images)

    def describe_and_classify(self, name: str, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Searchable descriptors (Q, dim) and class probabilities (Q, C) from one pass of a fine-tuned method."""
        extractor, _ = self.class_predictor(name)
        raw = extractor.extract(images)
        return extractor.transform(raw), extractor.class_probabilities(raw)

    def check_queries(self, name: str, queries: np.ndarray) -> np.ndarray:
        """Validate a (Q, dim) query matrix for a method; returns it as contiguous float32."""
        info = self.method(name)
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != info.dim:
            raise InvalidInputError(
                f"method {name!r} takes {info.dim}-dimensional vectors, got shape {tuple(np.shape(queries))}"
            )
        if not np.isfinite(q).all():
            raise InvalidInputError("query vector contains NaN or infinite values")
        return np.ascontiguousarray(q)

    def allowed_rows(self, filters: Mapping[str, Sequence[str]] | None) -> RowSelection | None:
        """Rows whose metadata matches every field (any of its values), as a mask and as filters; None = no filter."""
        if not filters:
            return None
        mask = np.ones(len(self.bundle), dtype=bool)
        for field, values in filters.items():
            if field not in self._values:
                raise InvalidInputError(
                    f"unknown filter field {shown(field)}; filterable fields are {', '.join(self.filter_fields)}"
                )
            if not values:
                raise InvalidInputError(f"filter on {field!r} lists no values")
            field_mask = np.zeros(len(self.bundle), dtype=bool)
            for value in values:
                rows = self._values[field].get(value)
                if rows is not None:
                    field_mask[rows] = True
            mask &= field_mask
        return RowSelection(mask, {field: frozenset(values) for field, values in filters.items()})

    def search(
        self,
        method: str,
        queries: np.ndarray,
        k: int,
        *,
        allowed: Allowed = None,
        exclude: Sequence[np.ndarray] | None = None,
        rerank: str | None = None,
        rerank_queries: np.ndarray | None = None,
        k_prep: int | None = None,
        expansion: QueryExpansion | None = None,
        reciprocal: ReciprocalRerank | None = None,
    ) -> SearchResult:
        """Exact top-k for each query row.

        Args:
            method: method that finds candidates.
            queries: (Q, dim) descriptors for ``method``.
            k: hits per query.
            allowed: searchable rows (metadata filters: a :class:`RowSelection` or an (N,) bool mask); exact, never a
                lossy post-filter.
            exclude: per query, rows never to return (the query itself, same-patient images).
            rerank: method whose distance re-sorts the top ``k_prep`` candidates.
            rerank_queries: (Q, dim_rerank) descriptors for ``rerank``.
            k_prep: candidates taken from ``method`` before re-ranking (at least k).
            expansion: alpha query expansion: each query is first moved towards its own top hits (same filters and
                exclusions), then searched again; the distances returned are the expanded query's.
            reciprocal: k-reciprocal re-ranking of the top max(k, k_prep, k1) candidates (instead of ``rerank``);
                the distances returned are the blended re-ranking distances.

        Returns:
            :class:`SearchResult` with (Q, k) rows and distances.
        """
        if k < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        info = self.method(method)
        q = self.check_queries(method, queries)
        if exclude is not None and len(exclude) != len(q):
            raise ValueError("exclude needs one entry per query")
        if expansion is not None:
            with stage("expand"):
                q = self._expand(info, q, expansion, allowed, exclude)
        if reciprocal is not None:
            if rerank is not None:
                raise InvalidInputError("k-reciprocal re-ranking replaces rerank: ask for one of them")
            return self._reciprocal_search(info, q, k, max(k, k_prep or k, reciprocal.k1), reciprocal, allowed, exclude)
        if rerank is None:
            with stage("search"):
                return self._knn(info, q, k, allowed, exclude)
        if rerank_queries is None:
            raise InvalidInputError(f"re-ranking by {rerank!r} needs the query's {rerank} descriptor")
        k_prep = max(k, k_prep or k)
        rinfo = self.method(rerank)
        rq = self.check_queries(rerank, rerank_queries)
        if len(rq) != len(q):
            raise ValueError("rerank_queries needs one row per query")
        with stage("search"):
            candidates = self._knn(info, q, k_prep, allowed, exclude).rows
        with stage("rerank"):
            return best_k(candidates, self._candidate_distances(rinfo, rq, candidates), k)

    def _reciprocal_search(
        self,
        info: MethodIndex,
        q: np.ndarray,
        k: int,
        pool: int,
        reciprocal: ReciprocalRerank,
        allowed: Allowed,
        exclude: Sequence[np.ndarray] | None,
    ) -> SearchResult:
        with stage("search"):
            found = self._knn(info, q, pool, allowed, exclude)
        with stage("rerank"):
            valid = found.rows >= 0
            shape = (*found.rows.shape, reciprocal.k1)
            neighbours = np.full(shape, -1, np.int64)
            neighbour_distances = np.full(shape, np.inf, np.float32)
            if valid.any():
                unique, local = np.unique(found.rows[valid], return_inverse=True)
                around = self._knn(info, self.backend.vectors(info, unique), reciprocal.k1, allowed, None)
                neighbours[valid], neighbour_distances[valid] = around.rows[local], around.distances[local]
            dist = reciprocal_distances(
                found.rows, found.distances, neighbours, neighbour_distances, reciprocal.k1, reciprocal.blend
            )
            return best_k(found.rows, dist, k)

    def _expand(
        self,
        info: MethodIndex,
        q: np.ndarray,
        expansion: QueryExpansion,
        allowed: Allowed,
        exclude: Sequence[np.ndarray] | None,
    ) -> np.ndarray:
        top = self._knn(info, q, expansion.neighbours, allowed, exclude)
        valid = top.rows >= 0
        neighbours = np.zeros((*top.rows.shape, q.shape[1]), np.float32)
        if valid.any():
            unique, local = np.unique(top.rows[valid], return_inverse=True)
            neighbours[valid] = self.backend.vectors(info, unique)[local]
        return expand_queries(q, neighbours, top.distances, valid, info.metric, expansion.alpha)

    def _candidate_distances(self, info: MethodIndex, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Exact distances (Q, K) of each query to its candidate rows, over the backend's stored vectors."""
        valid = candidates >= 0
        if not valid.any():
            return np.full(candidates.shape, np.inf, np.float32)
        unique, local = np.unique(candidates[valid], return_inverse=True)
        compact = np.full(candidates.shape, -1, np.int64)
        compact[valid] = local
        return candidate_distances(queries, self.backend.vectors(info, unique), compact, info.metric)

    def class_predictor(self, method: str) -> tuple[Extractor, str]:
        """The method's extractor and the metadata field its classes name, for class-predicted search."""
        extractor = self.extractor(method)
        if not extractor.can_classify:
            raise InvalidInputError(
                f"method {method!r} has no classification head; index a checkpoint from `cbmir train` to use "
                "class-predicted search"
            )
        field = (extractor.training or {}).get("label_field") or "label"
        if field not in self._values:
            raise InvalidInputError(
                f"class-predicted search needs the metadata field {field!r}, absent from this index"
            )
        return extractor, field

    def search_predicted_class(
        self,
        method: str,
        queries: np.ndarray,
        probabilities: np.ndarray,
        k: int,
        *,
        min_confidence: float = 0.5,
        allowed: Allowed = None,
        exclude: Sequence[np.ndarray] | None = None,
        rerank: str | None = None,
        rerank_queries: np.ndarray | None = None,
        k_prep: int | None = None,
        expansion: QueryExpansion | None = None,
        reciprocal: ReciprocalRerank | None = None,
        neighbour_vote: int = 0,
    ) -> tuple[SearchResult, np.ndarray]:
        """Search only the predicted class when the head is confident; the full archive otherwise.

        A confident query whose class holds fewer than k searchable images is topped up with the best hits from
        the rest of the archive, so it still gets k hits.

        Args:
            probabilities: (Q, C) class probabilities from the method's head (columns follow its ``classes``).
            min_confidence: smallest top probability that restricts the search to the predicted class.
            neighbour_vote: > 0 predicts from the mean of the head's probabilities and the class shares among the
                query's ``neighbour_vote`` nearest searchable archive images (one more search per query).
            Other arguments as in :meth:`search`.

        Returns:
            The result and (Q,) int64 predicted class index, -1 where the query fell back to the full archive.
        """
        extractor, field = self.class_predictor(method)
        classes = extractor.classes or []
        probs = np.asarray(probabilities, dtype=np.float32)
        if probs.shape != (len(queries), len(classes)):
            raise ValueError(f"probabilities must be (Q, {len(classes)}), got {probs.shape}")
        if not 0.0 <= min_confidence <= 1.0:
            raise InvalidInputError(f"min_confidence must be within [0, 1], got {min_confidence}")
        if neighbour_vote < 0:
            raise InvalidInputError(f"neighbour_vote must be 0 (off) or a number of neighbours, got {neighbour_vote}")
        if neighbour_vote:
            votes = self._class_shares(method, queries, neighbour_vote, field, classes, allowed, exclude)
            probs = ((probs + votes) / 2).astype(np.float32)
        predicted = np.where(probs.max(axis=1) >= min_confidence, probs.argmax(axis=1), -1).astype(np.int64)

        def run(sel: np.ndarray, mask: Allowed) -> SearchResult:
            return self.search(
                method,
                queries[sel],
                k,
                allowed=mask,
                exclude=None if exclude is None else [exclude[i] for i in sel],
                rerank=rerank,
                rerank_queries=None if rerank_queries is None else rerank_queries[sel],
                k_prep=k_prep,
                expansion=expansion,
                reciprocal=reciprocal,
            )

        rows = np.full((len(queries), k), -1, np.int64)
        dist = np.full((len(queries), k), np.inf, np.float32)
        for c in np.unique(predicted):
            sel = np.flatnonzero(predicted == c)
            mask = allowed
            if c >= 0:
                selection = self.allowed_rows({field: [classes[c]]})
                mask = selection if allowed is None or selection is None else selection & allowed
            result = run(sel, mask)
            rows[sel], dist[sel] = result.rows, result.distances
        short = np.flatnonzero((predicted >= 0) & (rows[:, -1] < 0))
        if len(short):
            full = run(short, allowed)
            for j, i in enumerate(short):
                have = rows[i][rows[i] >= 0]
                extra = ~np.isin(full.rows[j], have) & (full.rows[j] >= 0)
                fill = k - len(have)
                rows[i, len(have) :] = np.concatenate([full.rows[j][extra][:fill], np.full(fill, -1)])[:fill]
                dist[i, len(have) :] = np.concatenate([full.distances[j][extra][:fill], np.full(fill, np.inf)])[:fill]
        return SearchResult(rows, dist), predicted

    def _class_shares(
        self,
        method: str,
        queries: np.ndarray,
        n: int,
        field: str,
        classes: Sequence[str],
        allowed: Allowed,
        exclude: Sequence[np.ndarray] | None,
    ) -> np.ndarray:
        """(Q, C) share of each class among each query's ``n`` nearest archive images (unlabelled hits count for
        no class)."""
        hits = self.search(method, queries, n, allowed=allowed, exclude=exclude).rows
        row_class = np.full(len(self.bundle), -1, np.int64)
        for c, name in enumerate(classes):
            rows = self._values[field].get(name)
            if rows is not None:
                row_class[rows] = c
        hit_class = np.where(hits >= 0, row_class[np.maximum(hits, 0)], -1)
        shares = np.zeros((len(queries), len(classes)), np.float32)
        q, j = np.nonzero(hit_class >= 0)
        np.add.at(shares, (q, hit_class[q, j]), 1.0 / n)
        return shares

    def _knn(
        self,
        info: MethodIndex,
        q: np.ndarray,
        k: int,
        allowed: Allowed,
        exclude: Sequence[np.ndarray] | None,
    ) -> SearchResult:
        rows, dist = self.backend.knn(info, q, k, allowed, exclude)
        return SearchResult(rows, dist)
