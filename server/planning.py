"""From a validated request to a query plan: what to describe, how to search it, which rows to allow or skip."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbmir.errors import InvalidInputError, NotFoundError, shown
from cbmir.extractors.imaging import pixels_from_buffer
from cbmir.search_backends import Allowed
from cbmir.timing import stage
from cbmir.v1 import retrieval_pb2 as pb

from .config import DEFAULT_K, ServerConfig
from .fusion import FUSIONS
from .query_expansion import DEFAULT_EXPANSION_ALPHA, QueryExpansion
from .reciprocal_rerank import ReciprocalRerank
from .result_shaping import Shaping
from .search_engine import SearchEngine


@dataclass
class QueryPlan:
    """One validated query: what to describe, how to search it."""

    kind: str
    method: str
    k: int
    rerank: str | None
    k_prep: int
    allowed: Allowed
    filter_key: tuple[tuple[str, tuple[str, ...]], ...]
    exclude: np.ndarray
    image: np.ndarray | None = None
    vector: np.ndarray | None = None
    rerank_vector: np.ndarray | None = None
    min_class_confidence: float | None = None
    class_vote: int = 0
    probabilities: np.ndarray | None = None
    predicted_class: str = ""
    shaping: Shaping = Shaping()
    study_images: list[np.ndarray] | None = None
    expansion: QueryExpansion | None = None
    reciprocal: ReciprocalRerank | None = None
    fusion: str = "min"


MAX_NAME_CHARS = 128
"""Longest method name, filter field or pixel dtype accepted."""
MAX_VALUE_CHARS = 1024
"""Longest archive id or filter value accepted."""
MAX_LIST_ITEMS = 10_000
"""Most exclude_ids, filters, or values of one filter, in one request."""
MAX_CLASS_VOTE = 100
"""Most neighbours voting on a predicted class."""


def _check_length(what: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidInputError(f"{what} is {len(value)} characters long; the limit is {limit}")


def check_string_fields(request: pb.SearchRequest) -> None:
    """Refuse oversized strings and lists before any of them is used or echoed.

    Raises:
        InvalidInputError: naming the field, its length and the limit.
    """
    _check_length("method", request.method, MAX_NAME_CHARS)
    _check_length("rerank", request.rerank, MAX_NAME_CHARS)
    _check_length("archive_id", request.archive_id, MAX_VALUE_CHARS)
    _check_length("pixels.dtype", request.pixels.dtype, MAX_NAME_CHARS)
    for what, count in (("exclude_ids", len(request.exclude_ids)), ("filters", len(request.filters))):
        if count > MAX_LIST_ITEMS:
            raise InvalidInputError(f"{what} holds {count} items; the limit is {MAX_LIST_ITEMS}")
    for excluded in request.exclude_ids:
        _check_length("an exclude_ids entry", excluded, MAX_VALUE_CHARS)
    for f in request.filters:
        _check_length("a filter field", f.field, MAX_NAME_CHARS)
        if len(f.values) > MAX_LIST_ITEMS:
            raise InvalidInputError(
                f"filter {shown(f.field)} lists {len(f.values)} values; the limit is {MAX_LIST_ITEMS}"
            )
        for value in f.values:
            _check_length(f"a value of filter {shown(f.field)}", value, MAX_VALUE_CHARS)


def default_method(engine: SearchEngine, config: ServerConfig) -> str:
    """The configured default method when the bundle has it, else the bundle's first method."""
    return config.default_method if config.default_method in engine.methods else engine.methods[0]


def plan_query(engine: SearchEngine, request: pb.SearchRequest, config: ServerConfig) -> QueryPlan:
    """Validate one request against the engine and the limits; decode its image (the ``decode`` stage).

    Raises:
        InvalidInputError: a field is out of range or inconsistent; NotFoundError: unknown archive id.
    """
    check_string_fields(request)
    k = request.k or DEFAULT_K
    if not 1 <= k <= config.max_k:
        raise InvalidInputError(f"k must be between 1 and {config.max_k}, got {k}")
    method = request.method or default_method(engine, config)
    engine.method(method)
    rerank = request.rerank or None
    if rerank is not None:
        engine.method(rerank)
    k_prep = request.k_prep or max(k, DEFAULT_K)
    if rerank is not None and not k <= k_prep <= config.max_k_prep:
        raise InvalidInputError(f"k_prep must be between k ({k}) and {config.max_k_prep}, got {k_prep}")
    filters: dict[str, list[str]] = {}
    for f in request.filters:
        if not f.field:
            raise InvalidInputError("a filter needs a field name")
        filters.setdefault(f.field, []).extend(f.values)
    allowed = engine.allowed_rows(filters)
    row_of = engine.bundle.row_of
    excluded = row_of.rows(list(request.exclude_ids))
    kind = request.WhichOneof("query")
    filter_key = tuple(sorted((f, tuple(sorted(set(v)))) for f, v in filters.items()))
    plan = QueryPlan(kind or "", method, k, rerank, k_prep, allowed, filter_key, np.unique(excluded[excluded >= 0]))
    if request.expand:
        alpha = request.expand_alpha if request.HasField("expand_alpha") else DEFAULT_EXPANSION_ALPHA
        plan.expansion = QueryExpansion(request.expand, alpha)
    elif request.HasField("expand_alpha"):
        raise InvalidInputError("expand_alpha needs expand (the number of hits the query is averaged with)")
    if request.reciprocal_k1:
        if rerank is not None:
            raise InvalidInputError("reciprocal_k1 (k-reciprocal re-ranking) replaces rerank: ask for one of them")
        plan.reciprocal = ReciprocalRerank(request.reciprocal_k1)
    if kind is None and request.study_images:
        return _study_plan(engine, request, config, plan)
    if request.study_images:
        raise InvalidInputError(f"study_images replace the query: leave {kind} unset")
    if kind is None:
        raise InvalidInputError("empty request: set one of image, pixels, archive_id, vector or study_images")
    if kind == "image":
        with stage("decode"):
            plan.image = engine.decode(request.image, max_pixels=config.max_pixels)
    elif kind == "pixels":
        p = request.pixels
        if p.width * p.height > config.max_pixels:
            raise InvalidInputError(f"pixel array {p.width}x{p.height} exceeds {config.max_pixels} pixels")
        with stage("decode"):
            plan.image = pixels_from_buffer(p.width, p.height, p.dtype, p.data)
    elif kind == "archive_id":
        row = row_of.get(request.archive_id)
        if row is None:
            raise NotFoundError(
                f"archive id {shown(request.archive_id)} is not in index version {engine.bundle.version}"
            )
        plan.vector = engine.method(method).descriptors[row : row + 1]
        if rerank is not None:
            plan.rerank_vector = engine.method(rerank).descriptors[row : row + 1]
        if not request.include_self:
            plan.exclude = np.union1d(plan.exclude, [row]).astype(np.int64)
    else:
        plan.vector = engine.check_queries(method, np.asarray(request.vector.values, dtype=np.float32))
        if rerank is not None:
            if not request.HasField("rerank_vector"):
                raise InvalidInputError(f"a vector query re-ranked by {rerank!r} needs rerank_vector")
            plan.rerank_vector = engine.check_queries(
                rerank, np.asarray(request.rerank_vector.values, dtype=np.float32)
            )
    if request.predict_class:
        if kind not in ("image", "pixels"):
            raise InvalidInputError("predict_class needs an image query (image or pixels)")
        engine.class_predictor(method)
        confidence = request.min_class_confidence or 0.5
        if not 0.0 <= confidence <= 1.0:
            raise InvalidInputError(f"min_class_confidence must be within [0, 1], got {confidence}")
        plan.min_class_confidence = confidence
        if request.class_vote > MAX_CLASS_VOTE:
            raise InvalidInputError(f"class_vote must be within 0..{MAX_CLASS_VOTE}, got {request.class_vote}")
        plan.class_vote = request.class_vote
    elif request.class_vote:
        raise InvalidInputError("class_vote needs predict_class (it votes on the predicted class)")
    plan.shaping = _shaping(engine, request, config, plan)
    return plan


def _study_plan(engine: SearchEngine, request: pb.SearchRequest, config: ServerConfig, plan: QueryPlan) -> QueryPlan:
    """A study query: its images decoded, the fusion checked; re-ranking, shaping and class prediction refused."""
    if len(request.study_images) > config.max_study_images:
        raise InvalidInputError(
            f"{len(request.study_images)} study images exceed the limit of {config.max_study_images}"
        )
    fusion = request.fusion or "min"
    if fusion not in FUSIONS:
        raise InvalidInputError(f"fusion must be one of {', '.join(FUSIONS)}, got {shown(fusion)}")
    if (
        plan.rerank
        or plan.expansion
        or plan.reciprocal
        or request.predict_class
        or request.group_by
        or request.offset
        or request.HasField("max_distance")
    ):
        raise InvalidInputError("study queries take k, method, filters and exclude_ids only")
    with stage("decode"):
        plan.study_images = [
            engine.decode(data, source=f"study image {i}", max_pixels=config.max_pixels)
            for i, data in enumerate(request.study_images)
        ]
    plan.kind, plan.fusion = "study", fusion
    return plan


def _shaping(engine: SearchEngine, request: pb.SearchRequest, config: ServerConfig, plan: QueryPlan) -> Shaping:
    """Group-by, distance cut-off and paging of one request, validated."""
    group_size = request.group_size or 1
    if request.group_by and request.group_by not in engine.filter_fields:
        raise InvalidInputError(
            f"unknown group_by field {shown(request.group_by)}; fields: {', '.join(engine.filter_fields)}"
        )
    if not 1 <= group_size <= config.max_group_size:
        raise InvalidInputError(f"group_size must be between 1 and {config.max_group_size}, got {group_size}")
    if request.group_size and not request.group_by:
        raise InvalidInputError("group_size needs group_by")
    if request.offset > config.max_offset:
        raise InvalidInputError(f"offset must be at most {config.max_offset}, got {request.offset}")
    max_distance = request.max_distance if request.HasField("max_distance") else None
    if max_distance is not None and not (np.isfinite(max_distance) and max_distance >= 0):
        raise InvalidInputError(f"max_distance must be a finite number >= 0, got {max_distance}")
    shaping = Shaping(request.group_by, group_size, max_distance, int(request.offset))
    if shaping.active and plan.min_class_confidence is not None:
        raise InvalidInputError("group_by, max_distance and offset do not combine with predict_class")
    return shaping
