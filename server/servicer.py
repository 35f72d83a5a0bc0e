"""The Retrieval servicer: each RPC plans, describes (micro-batched), searches and streams hits on one engine."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from cbmir.errors import BundleError, CbmirError, InvalidInputError, NotFoundError, NotReadyError
from cbmir.index_build.bundle import Bundle, load_bundle, resolve_version_dir
from cbmir.index_build.update import remove_from_bundle
from cbmir.search_backends import SearchBackend
from cbmir.timing import add_stages, stage
from cbmir.v1 import retrieval_pb2 as pb
from cbmir.v1 import retrieval_pb2_grpc as pb_grpc

from .admission import Admission, RequestScope, check_active
from .batching import MicroBatcher
from .config import ServerConfig
from .fusion import fused_search
from .ingestion import ingest
from .planning import QueryPlan, default_method, plan_query
from .result_shaping import ShapedHits, shaped_search
from .search_engine import SearchEngine
from .thumbnails import thumbnails

log = logging.getLogger("cbmir.server")


class RetrievalService(pb_grpc.RetrievalServicer):
    """Servicer; the engine (bundle, indices, warm extractors) is loaded once and shared by all requests.

    A reload builds and warms a complete new engine beside the live one and then swaps one reference, so every
    request runs start to finish on exactly one index version and none fails during the swap.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.admission = Admission(config.concurrency)
        self.stats = self.admission.stats
        self.metrics = self.admission.metrics
        self._live: tuple[SearchEngine, dict[str, MicroBatcher]] | None = None
        self._reload_lock = threading.Lock()
        self._ingest_lock = threading.Lock()
        self._milvus: Any = None

    def _backend(self, bundle: Bundle, *, publish: bool = False) -> SearchBackend | None:
        """The Milvus backend for ``bundle`` when serving from Milvus (one client for the server's life), else
        None (the engine's in-process FAISS); ``publish`` loads the version into Milvus first."""
        if not self.config.milvus:
            return None
        from cbmir.search_backends.milvus_backend import MilvusBackend
        from cbmir.search_backends.milvus_publish import connect_milvus, publish_bundle

        if self._milvus is None:
            self._milvus = connect_milvus(self.config.milvus)
        if publish:
            publish_bundle(bundle, self._milvus, self.config.milvus_collection)
        return MilvusBackend(bundle, self._milvus, self.config.milvus, self.config.milvus_collection)

    @property
    def engine(self) -> SearchEngine | None:
        live = self._live
        return None if live is None else live[0]

    @property
    def batchers(self) -> dict[str, MicroBatcher]:
        live = self._live
        return {} if live is None else live[1]

    def load(self, *, publish: bool = False) -> bool:
        """Load, validate and warm the bundle's live version and make it the one requests use.

        ``publish``: when serving from Milvus, first publish the version (this server just wrote it by ingestion).

        Returns:
            False when that version is already being served (nothing changed).
        """
        import torch

        torch.set_num_threads(self.config.torch_threads)
        with self._reload_lock:
            t0 = time.perf_counter()
            old = self.engine
            if old is not None and resolve_version_dir(self.config.index) == old.bundle.path:
                self.metrics.reloads.labels(result="unchanged").inc()
                return False
            try:
                bundle = load_bundle(self.config.index, search_indexes=not self.config.milvus)
                engine = SearchEngine(
                    bundle,
                    device=self.config.device,
                    runtime=self.config.runtime,
                    precision=self.config.precision,
                    search_device=self.config.search_device,
                    backend=self._backend(bundle, publish=publish),
                )
                engine.warmup()
            except CbmirError:
                self.metrics.reloads.labels(result="failed").inc()
                raise
            except Exception as exc:
                self.metrics.reloads.labels(result="failed").inc()
                raise BundleError(
                    f"{self.config.index}: cannot load the live version ({type(exc).__name__}: {exc})"
                ) from exc
            batchers: dict[str, MicroBatcher] = {}
            if self.config.micro_batch > 0:
                batchers = {
                    m: MicroBatcher(
                        functools.partial(engine.describe, m),
                        self.config.micro_batch,
                        m,
                        on_batch=self.metrics.micro_batch.labels(method=m).observe,
                    )
                    for m in engine.methods
                }
            old_batchers = self.batchers
            self._live = (engine, batchers)
            for batcher in old_batchers.values():
                batcher.close()
            self.metrics.reloads.labels(result="changed").inc()
            self.metrics.serving(engine.bundle.version, len(engine.bundle))
            log.info(
                json.dumps(
                    {
                        "event": "loaded",
                        "index": str(engine.bundle.path),
                        "version": engine.bundle.version,
                        "previous": None if old is None else old.bundle.version,
                        "count": len(engine.bundle),
                        "methods": engine.methods,
                        "seconds": round(time.perf_counter() - t0, 3),
                    }
                )
            )
            return True

    def Reload(self, request: pb.ReloadRequest, context: grpc.ServicerContext) -> pb.ReloadResponse:
        previous = self._engine().bundle.version
        changed = self.load()
        engine = self._engine()
        return pb.ReloadResponse(
            version=engine.bundle.version, previous_version=previous, changed=changed, count=len(engine.bundle)
        )

    # ----------------------------------------------------------------------------------------------- RPCs
    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> Iterator[pb.SearchHit]:
        hits: list[pb.SearchHit] = []
        scope = self._request("Search", context)
        with scope as (engine, record):
            plan = plan_query(engine, request, self.config)
            record.update(query=plan.kind, method=plan.method, rerank=plan.rerank, k=plan.k)
            self._describe(engine, [plan], context)
            answers = self._search(engine, [plan], context)
            hits = self._hits(engine, answers[0])
            record["hits"] = len(hits)
            trailers = [("cbmir-timings-ms", json.dumps({k: round(v, 3) for k, v in scope.stages.items()}))]
            if plan.min_class_confidence is not None:
                record["predicted_class"] = plan.predicted_class
                trailers.append(("cbmir-predicted-class", plan.predicted_class))
            context.set_trailing_metadata(tuple(trailers))
        yield from self._stream(hits, context, lambda _: 1)

    def SearchBatch(
        self, request: pb.SearchBatchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SearchBatchResult]:
        if not request.queries:
            raise InvalidInputError("SearchBatch needs at least one query")
        if len(request.queries) > self.config.max_batch:
            raise InvalidInputError(
                f"batch of {len(request.queries)} queries exceeds the limit of {self.config.max_batch}; split it"
            )
        results: list[pb.SearchBatchResult] = []
        with self._request("SearchBatch", context) as (engine, record):
            plans = []
            for i, query in enumerate(request.queries):
                try:
                    plans.append(plan_query(engine, query, self.config))
                except (InvalidInputError, NotFoundError) as exc:
                    raise type(exc)(f"query {i}: {exc}") from exc
            record.update(queries=len(plans))
            self._describe(engine, plans, context)
            answers = self._search(engine, plans, context)
            results = [
                pb.SearchBatchResult(query_index=i, hits=self._hits(engine, answers[i])) for i in range(len(plans))
            ]
        yield from self._stream(results, context, lambda r: len(r.hits))

    def AddImages(
        self, request_iterator: Iterator[pb.AddImageRequest], context: grpc.ServicerContext
    ) -> pb.AddImagesResponse:
        with self._ingest_lock, self._request("AddImages", context) as (engine, record):
            results, report = ingest(engine, request_iterator, self.config)
            if report is not None and report.added:
                self.load(publish=True)  # the new version is durable on disk; serve it before acknowledging
            record.update(items=len(results), added=sum(r.status == "added" for r in results))
            for result in results:
                self.metrics.ingested.labels(status=result.status).inc()
        live = self._engine()
        return pb.AddImagesResponse(results=results, version=live.bundle.version, count=len(live.bundle))

    def RemoveImages(self, request: pb.RemoveImagesRequest, context: grpc.ServicerContext) -> pb.RemoveImagesResponse:
        with self._ingest_lock, self._request("RemoveImages", context) as (_, record):
            report = remove_from_bundle(self.config.index, list(request.ids), missing_ok=request.missing_ok)
            if report.removed:
                self.load(publish=True)
            record.update(removed=len(report.removed))
        live = self._engine()
        return pb.RemoveImagesResponse(removed=report.removed, version=live.bundle.version, count=len(live.bundle))

    def GetThumbnails(self, request: pb.ThumbnailsRequest, context: grpc.ServicerContext) -> pb.ThumbnailsResponse:
        with self._request("GetThumbnails", context) as (engine, record):
            items = thumbnails(
                engine,
                list(request.ids),
                request.max_side,
                max_ids=self.config.max_thumbnails,
                max_side_limit=self.config.max_thumbnail_side,
            )
            record.update(ids=len(items), errors=sum(1 for t in items if t.error))
        return pb.ThumbnailsResponse(thumbnails=items)

    def GetIndexInfo(self, request: pb.GetIndexInfoRequest, context: grpc.ServicerContext) -> pb.IndexInfo:
        engine = self._engine()
        manifest = engine.bundle.manifest
        return pb.IndexInfo(
            version=engine.bundle.version,
            count=len(engine.bundle),
            methods=[
                pb.MethodInfo(
                    name=m.name,
                    extractor=m.extractor,
                    dim=m.dim,
                    metric=m.metric,
                    index_type=m.index_type,
                    config_json=json.dumps(m.config),
                )
                for m in engine.bundle.methods.values()
            ],
            filter_fields=engine.filter_fields,
            created=manifest.get("created", ""),
            build_json=json.dumps(manifest.get("build", {})),
            max_k=self.config.max_k,
            cbmir_version=manifest.get("cbmir_version", ""),
            default_method=default_method(engine, self.config),
            max_batch=self.config.max_batch,
            max_thumbnails=self.config.max_thumbnails,
            max_thumbnail_side=self.config.max_thumbnail_side,
            capabilities=[
                "group_by",
                "max_distance",
                "offset",
                "thumbnails",
                "ingest",
                "remove",
                "reload",
                *(["predict_class"] if any(engine.extractor(m).can_classify for m in engine.methods) else []),
            ],
            max_group_size=self.config.max_group_size,
            max_offset=self.config.max_offset,
            max_ingest_items=self.config.max_ingest_items,
        )

    # ------------------------------------------------------------------------------------------ helpers
    def _engine(self) -> SearchEngine:
        if self.engine is None:
            raise NotReadyError("the index is still loading; retry when health reports SERVING")
        return self.engine

    def _request(self, rpc: str, context: grpc.ServicerContext) -> RequestScope:
        return self.admission.request(rpc, context, self._engine)

    def _stream(self, items: Sequence[Any], context: grpc.ServicerContext, count: Any) -> Iterator[Any]:
        """Yield ``items`` while the client listens; a cancelled or abandoned stream stops early."""
        try:
            for item in items:
                if not context.is_active():
                    self.stats.add("cancelled")
                    return
                yield item
                self.stats.add("hits_streamed", count(item))
        except GeneratorExit:
            self.stats.add("cancelled")
            raise

    def _describe(self, engine: SearchEngine, plans: Sequence[QueryPlan], context: grpc.ServicerContext) -> None:
        """Describe every image query, one batched pass per method."""
        check_active(context)
        needed: dict[str, list[tuple[QueryPlan, str]]] = {}
        images: dict[str, list[np.ndarray]] = {}
        for plan in plans:
            if plan.study_images is not None:
                plan.vector = engine.describe(plan.method, plan.study_images)
                continue
            if plan.image is None:
                continue
            if plan.min_class_confidence is not None:
                plan.vector, plan.probabilities = engine.describe_and_classify(plan.method, [plan.image])
            else:
                needed.setdefault(plan.method, []).append((plan, "vector"))
                images.setdefault(plan.method, []).append(plan.image)
            if plan.rerank is not None:
                needed.setdefault(plan.rerank, []).append((plan, "rerank_vector"))
                images.setdefault(plan.rerank, []).append(plan.image)
        live = self._live
        batchers = live[1] if live is not None and live[0] is engine else {}
        submitted = {m: batchers[m].submit(images[m]) for m in needed if m in batchers}
        for method, targets in needed.items():
            pending = submitted.get(method)
            if pending is None:
                vectors = engine.describe(method, images[method])
            else:
                t0 = time.perf_counter()
                vectors, stages = pending.result()
                waited = (time.perf_counter() - t0) * 1000
                add_stages({**stages, "queue": max(0.0, waited - sum(stages.values()))})
            for (plan, attr), v in zip(targets, vectors):
                setattr(plan, attr, v[None, :])
            check_active(context)

    def _search(
        self, engine: SearchEngine, plans: Sequence[QueryPlan], context: grpc.ServicerContext
    ) -> list[ShapedHits]:
        """Search the plans, grouped so that queries sharing method, k, filter and shaping run as one batch."""
        answers: list[ShapedHits] = [ShapedHits([], [], [], [])] * len(plans)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, p in enumerate(plans):
            if p.study_images is not None and p.vector is not None:
                with stage("search"):
                    rows, dists = fused_search(
                        engine, p.method, p.vector, p.k, p.fusion, allowed=p.allowed, exclude=p.exclude
                    )
                answers[i] = ShapedHits(rows.tolist(), dists.tolist(), list(range(1, len(rows) + 1)), [""] * len(rows))
                self.stats.add("searches")
                continue
            key = (
                p.method,
                p.rerank,
                p.k,
                p.k_prep,
                p.filter_key,
                p.min_class_confidence,
                p.class_vote,
                p.shaping,
                p.expansion,
                p.reciprocal,
            )
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            first = plans[members[0]]
            common: dict[str, Any] = {
                "allowed": first.allowed,
                "exclude": [plans[i].exclude for i in members],
                "rerank": first.rerank,
                "rerank_queries": None
                if first.rerank is None
                else np.concatenate([plans[i].rerank_vector for i in members]),
                "k_prep": first.k_prep,
                "expansion": first.expansion,
                "reciprocal": first.reciprocal,
            }
            queries = np.concatenate([plans[i].vector for i in members])
            if first.min_class_confidence is not None:
                result, predicted = engine.search_predicted_class(
                    first.method,
                    queries,
                    np.concatenate([plans[i].probabilities for i in members]),
                    first.k,
                    min_confidence=first.min_class_confidence,
                    neighbour_vote=first.class_vote,
                    **common,
                )
                classes = engine.extractor(first.method).classes or []
                for j, i in enumerate(members):
                    plans[i].predicted_class = classes[predicted[j]] if predicted[j] >= 0 else ""
            elif first.shaping.active:
                for j, shaped in enumerate(
                    shaped_search(engine, first.method, queries, first.k, first.shaping, **common)
                ):
                    answers[members[j]] = shaped
                self.stats.add("searches", len(members))
                check_active(context)
                continue
            else:
                result = engine.search(first.method, queries, first.k, **common)
            for j, i in enumerate(members):
                valid = result.rows[j] >= 0
                count = int(valid.sum())
                answers[i] = ShapedHits(
                    result.rows[j][valid].tolist(),
                    result.distances[j][valid].tolist(),
                    list(range(1, count + 1)),
                    [""] * count,
                )
            self.stats.add("searches", len(members))
            check_active(context)
        return answers

    @staticmethod
    def _hits(engine: SearchEngine, answer: ShapedHits) -> list[pb.SearchHit]:
        bundle = engine.bundle
        return [
            pb.SearchHit(
                id=bundle.ids[r],
                uri=bundle.uris[r],
                rank=rank,
                distance=float(d),
                metadata=bundle.record_metadata(int(r)),
                group=group,
            )
            for r, d, rank, group in zip(answer.rows, answer.distances, answer.ranks, answer.groups)
        ]
