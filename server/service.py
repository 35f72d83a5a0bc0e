"""The online phase: a gRPC server that loads one bundle and streams top-k hits for image, pixel, id or vector
queries, with re-ranking, exact metadata filters, health checking, reflection and graceful shutdown."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cbmir.errors import InvalidInputError, NotFoundError, NotReadyError, OverloadedError
from cbmir.extractors.imaging import DEFAULT_MAX_PIXELS, pixels_from_buffer
from cbmir.index_build.bundle import load_bundle, resolve_version_dir
from cbmir.timing import add_stages, recording, stage
from cbmir.v1 import retrieval_pb2 as pb
from cbmir.v1 import retrieval_pb2_grpc as pb_grpc

from .auth import TokenAuthInterceptor, read_tokens
from .batching import MicroBatcher
from .search_engine import SearchEngine
from .status import ErrorMappingInterceptor, status_for

log = logging.getLogger("cbmir.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retrieval"].full_name
DEFAULT_K = 10


@dataclass
class ServerConfig:
    """Server settings; every limit is enforced with a clear status code.

    ``torch_threads`` and ``search_threads`` are the intra-op threads one request uses; the default of one lets
    concurrent requests share the cores without oversubscription, and on this 2-core machine a single query was
    also fastest that way (FAISS flat, 128-d x 58,954: 1.1 ms on one thread, 2.4 ms on two). ``micro_batch``
    is the most query images one batched description takes across concurrent requests (0: describe each request
    on its own thread). ``watch_s`` > 0 checks the bundle's live version that often and swaps a new one in (as
    the ``Reload`` RPC and SIGHUP do).

    Security: ``tls_cert``/``tls_key`` (PEM) turn on TLS; ``tls_client_ca`` also requires client certificates signed
    by that CA (mutual TLS); ``tokens_file`` requires a bearer token on every call but health checks (see
    :mod:`cbmir.server.auth`).
    """

    index: str
    host: str = "127.0.0.1"
    port: int = 50051
    max_k: int = 100
    max_k_prep: int = 1000
    max_batch: int = 64
    workers: int = 8
    max_concurrent: int = 0
    max_message_mb: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"
    default_method: str = "cnn"
    grace_s: float = 10.0
    torch_threads: int = 1
    search_threads: int = 1
    micro_batch: int = 32
    watch_s: float = 0.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tokens_file: str | None = None

    @property
    def concurrency(self) -> int:
        return self.max_concurrent or self.workers


@dataclass
class ServiceStats:
    """Counters the tests and operators read; updated under a lock."""

    requests: int = 0
    searches: int = 0
    hits_streamed: int = 0
    cancelled: int = 0
    rejected_overload: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def error(self, code: grpc.StatusCode) -> None:
        with self.lock:
            self.errors[code.name] = self.errors.get(code.name, 0) + 1


class _Cancelled(Exception):
    """The client went away or its deadline passed; stop working."""


@dataclass
class _Plan:
    """One validated query: what to describe, how to search it."""

    kind: str
    method: str
    k: int
    rerank: str | None
    k_prep: int
    allowed: np.ndarray | None
    filter_key: tuple[tuple[str, tuple[str, ...]], ...]
    exclude: np.ndarray
    image: np.ndarray | None = None
    vector: np.ndarray | None = None
    rerank_vector: np.ndarray | None = None
    min_class_confidence: float | None = None
    probabilities: np.ndarray | None = None
    predicted_class: str = ""


class RetrievalService(pb_grpc.RetrievalServicer):
    """Servicer; the engine (bundle, indices, warm extractors) is loaded once and shared by all requests.

    A reload builds and warms a complete new engine beside the live one and then swaps one reference, so every
    request runs start to finish on exactly one index version and none fails during the swap.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stats = ServiceStats()
        self._slots = threading.BoundedSemaphore(config.concurrency)
        self._live: tuple[SearchEngine, dict[str, MicroBatcher]] | None = None
        self._reload_lock = threading.Lock()

    @property
    def engine(self) -> SearchEngine | None:
        live = self._live
        return None if live is None else live[0]

    @property
    def batchers(self) -> dict[str, MicroBatcher]:
        live = self._live
        return {} if live is None else live[1]

    def load(self) -> bool:
        """Load, validate and warm the bundle's live version and make it the one requests use.

        Returns:
            False when that version is already being served (nothing changed).
        """
        import torch

        torch.set_num_threads(self.config.torch_threads)
        with self._reload_lock:
            t0 = time.perf_counter()
            old = self.engine
            if old is not None and resolve_version_dir(self.config.index) == old.bundle.path:
                return False
            engine = SearchEngine(load_bundle(self.config.index), device=self.config.device)
            engine.warmup()
            batchers: dict[str, MicroBatcher] = {}
            if self.config.micro_batch > 0:
                batchers = {
                    m: MicroBatcher(lambda images, m=m: engine.describe(m, images), self.config.micro_batch, m)
                    for m in engine.methods
                }
            old_batchers = self.batchers
            self._live = (engine, batchers)
            for batcher in old_batchers.values():
                batcher.close()
            log.info(json.dumps({"event": "loaded", "index": str(engine.bundle.path), "version": engine.bundle.version,
                                 "previous": None if old is None else old.bundle.version, "count": len(engine.bundle),
                                 "methods": engine.methods, "seconds": round(time.perf_counter() - t0, 3)}))
            return True

    def Reload(self, request: pb.ReloadRequest, context: grpc.ServicerContext) -> pb.ReloadResponse:
        previous = self._engine().bundle.version
        changed = self.load()
        engine = self._engine()
        return pb.ReloadResponse(version=engine.bundle.version, previous_version=previous, changed=changed,
                                 count=len(engine.bundle))

    # ----------------------------------------------------------------------------------------------- RPCs
    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> Iterator[pb.SearchHit]:
        hits: list[pb.SearchHit] = []
        with self._request("Search", context) as (engine, record):
            plan = self._plan(engine, request)
            record.update(query=plan.kind, method=plan.method, rerank=plan.rerank, k=plan.k)
            self._describe(engine, [plan], context)
            rows, dists = self._search(engine, [plan], context)
            hits = self._hits(engine, rows[0], dists[0])
            record["hits"] = len(hits)
            if plan.min_class_confidence is not None:
                record["predicted_class"] = plan.predicted_class
                context.set_trailing_metadata((("cbmir-predicted-class", plan.predicted_class),))
        yield from self._stream(hits, context, lambda _: 1)

    def SearchBatch(self, request: pb.SearchBatchRequest, context: grpc.ServicerContext) -> Iterator[pb.SearchBatchResult]:
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
                    plans.append(self._plan(engine, query))
                except (InvalidInputError, NotFoundError) as exc:
                    raise type(exc)(f"query {i}: {exc}") from exc
            record.update(queries=len(plans))
            self._describe(engine, plans, context)
            rows, dists = self._search(engine, plans, context)
            results = [
                pb.SearchBatchResult(query_index=i, hits=self._hits(engine, rows[i], dists[i]))
                for i in range(len(plans))
            ]
        yield from self._stream(results, context, lambda r: len(r.hits))

    def GetIndexInfo(self, request: pb.GetIndexInfoRequest, context: grpc.ServicerContext) -> pb.IndexInfo:
        engine = self._engine()
        manifest = engine.bundle.manifest
        return pb.IndexInfo(
            version=engine.bundle.version,
            count=len(engine.bundle),
            methods=[
                pb.MethodInfo(name=m.name, extractor=m.extractor, dim=m.dim, metric=m.metric,
                              index_type=m.index_type, config_json=json.dumps(m.config))
                for m in engine.bundle.methods.values()
            ],
            filter_fields=engine.filter_fields,
            created=manifest.get("created", ""),
            build_json=json.dumps(manifest.get("build", {})),
            max_k=self.config.max_k,
            cbmir_version=manifest.get("cbmir_version", ""),
            default_method=self._default_method(engine),
            max_batch=self.config.max_batch,
        )

    # ------------------------------------------------------------------------------------------ helpers
    def _engine(self) -> SearchEngine:
        if self.engine is None:
            raise NotReadyError("the index is still loading; retry when health reports SERVING")
        return self.engine

    def _default_method(self, engine: SearchEngine) -> str:
        return self.config.default_method if self.config.default_method in engine.methods else engine.methods[0]

    def _request(self, rpc: str, context: grpc.ServicerContext) -> _RequestContext:
        return _RequestContext(self, rpc, context)

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

    def _plan(self, engine: SearchEngine, request: pb.SearchRequest) -> _Plan:
        k = request.k or DEFAULT_K
        if not 1 <= k <= self.config.max_k:
            raise InvalidInputError(f"k must be between 1 and {self.config.max_k}, got {k}")
        method = request.method or self._default_method(engine)
        engine.method(method)
        rerank = request.rerank or None
        if rerank is not None:
            engine.method(rerank)
        k_prep = request.k_prep or max(k, DEFAULT_K)
        if rerank is not None and not k <= k_prep <= self.config.max_k_prep:
            raise InvalidInputError(f"k_prep must be between k ({k}) and {self.config.max_k_prep}, got {k_prep}")
        filters: dict[str, list[str]] = {}
        for f in request.filters:
            if not f.field:
                raise InvalidInputError("a filter needs a field name")
            filters.setdefault(f.field, []).extend(f.values)
        allowed = engine.allowed_rows(filters)
        row_of = engine.bundle.row_of
        exclude = [row_of[i] for i in request.exclude_ids if i in row_of]
        kind = request.WhichOneof("query")
        filter_key = tuple(sorted((f, tuple(sorted(set(v)))) for f, v in filters.items()))
        plan = _Plan(kind or "", method, k, rerank, k_prep, allowed, filter_key, np.zeros(0, np.int64))
        if kind is None:
            raise InvalidInputError("empty request: set one of image, pixels, archive_id or vector")
        if kind == "image":
            with stage("decode"):
                plan.image = engine.decode(request.image, max_pixels=self.config.max_pixels)
        elif kind == "pixels":
            p = request.pixels
            if p.width * p.height > self.config.max_pixels:
                raise InvalidInputError(f"pixel array {p.width}x{p.height} exceeds {self.config.max_pixels} pixels")
            with stage("decode"):
                plan.image = pixels_from_buffer(p.width, p.height, p.dtype, p.data)
        elif kind == "archive_id":
            row = row_of.get(request.archive_id)
            if row is None:
                raise NotFoundError(f"archive id {request.archive_id!r} is not in index version {engine.bundle.version}")
            plan.vector = engine.method(method).descriptors[row : row + 1]
            if rerank is not None:
                plan.rerank_vector = engine.method(rerank).descriptors[row : row + 1]
            if not request.include_self:
                exclude.append(row)
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
        plan.exclude = np.asarray(sorted(set(exclude)), dtype=np.int64)
        return plan

    def _describe(self, engine: SearchEngine, plans: Sequence[_Plan], context: grpc.ServicerContext) -> None:
        """Describe every image query, one batched pass per method."""
        _check_active(context)
        needed: dict[str, list[tuple[_Plan, str]]] = {}
        for plan in plans:
            if plan.image is None:
                continue
            if plan.min_class_confidence is not None:
                plan.vector, plan.probabilities = engine.describe_and_classify(plan.method, [plan.image])
            else:
                needed.setdefault(plan.method, []).append((plan, "vector"))
            if plan.rerank is not None:
                needed.setdefault(plan.rerank, []).append((plan, "rerank_vector"))
        images = {method: [p.image for p, _ in targets] for method, targets in needed.items()}
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
            _check_active(context)

    def _search(
        self, engine: SearchEngine, plans: Sequence[_Plan], context: grpc.ServicerContext
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Search the plans, grouped so that queries sharing method, k and filter run as one batch."""
        rows: list[np.ndarray] = [np.zeros(0, np.int64)] * len(plans)
        dists: list[np.ndarray] = [np.zeros(0, np.float32)] * len(plans)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, p in enumerate(plans):
            key = (p.method, p.rerank, p.k, p.k_prep, p.filter_key, p.min_class_confidence)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            first = plans[members[0]]
            common: dict[str, Any] = {
                "allowed": first.allowed,
                "exclude": [plans[i].exclude for i in members],
                "rerank": first.rerank,
                "rerank_queries": None if first.rerank is None else np.concatenate(
                    [plans[i].rerank_vector for i in members]),
                "k_prep": first.k_prep,
            }
            queries = np.concatenate([plans[i].vector for i in members])
            if first.min_class_confidence is not None:
                result, predicted = engine.search_predicted_class(
                    first.method, queries, np.concatenate([plans[i].probabilities for i in members]), first.k,
                    min_confidence=first.min_class_confidence, **common,
                )
                classes = engine.extractor(first.method).classes or []
                for j, i in enumerate(members):
                    plans[i].predicted_class = classes[predicted[j]] if predicted[j] >= 0 else ""
            else:
                result = engine.search(first.method, queries, first.k, **common)
            for j, i in enumerate(members):
                rows[i], dists[i] = result.rows[j], result.distances[j]
            self.stats.add("searches", len(members))
            _check_active(context)
        return rows, dists

    @staticmethod
    def _hits(engine: SearchEngine, rows: np.ndarray, dists: np.ndarray) -> list[pb.SearchHit]:
        bundle = engine.bundle
        return [
            pb.SearchHit(id=bundle.ids[r], uri=bundle.uris[r], rank=rank, distance=float(d),
                         metadata=bundle.record_metadata(int(r)))
            for rank, (r, d) in enumerate(zip(rows.tolist(), dists.tolist()), start=1)
            if r >= 0
        ]


def _check_active(context: grpc.ServicerContext) -> None:
    if not context.is_active():
        raise _Cancelled()


class _RequestContext:
    """Admission control, timing, cancellation accounting and the one structured log line per request."""

    def __init__(self, service: RetrievalService, rpc: str, context: grpc.ServicerContext) -> None:
        self.service, self.rpc, self.context = service, rpc, context
        self.record: dict[str, Any] = {"rpc": rpc, "peer": context.peer()}
        self._recording = recording()
        self._acquired = False

    def __enter__(self) -> tuple[SearchEngine, dict[str, Any]]:
        self.t0 = time.perf_counter()
        self.service.stats.add("requests")
        engine = self.service._engine()
        if not self.service._slots.acquire(blocking=False):
            self.service.stats.add("rejected_overload")
            raise OverloadedError(
                f"server is at its limit of {self.service.config.concurrency} concurrent searches; retry with back-off"
            )
        self._acquired = True
        self.stages = self._recording.__enter__()
        return engine, self.record

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        self._recording.__exit__(exc_type, exc, tb)
        if self._acquired:
            self.service._slots.release()
        status = "OK"
        suppress = False
        if isinstance(exc, _Cancelled):
            self.service.stats.add("cancelled")
            status, suppress = "CANCELLED", True
        elif exc is not None:
            code, _ = status_for(exc)
            self.service.stats.error(code)
            status = code.name
        self.record.update(
            status=status,
            ms={**{k: round(v, 3) for k, v in self.stages.items()},
                "total": round((time.perf_counter() - self.t0) * 1000, 3)},
        )
        log.info(json.dumps(self.record, default=str))
        return suppress


@dataclass
class RunningServer:
    """A started server: its bound port, servicer (for stats), health servicer and grpc server."""

    server: grpc.Server
    port: int
    service: RetrievalService
    health: health.HealthServicer
    ready: threading.Event

    def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING first, then in-flight streams get ``grace`` seconds to finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace if grace is not None else self.service.config.grace_s).wait()
        for batcher in self.service.batchers.values():
            batcher.close()


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (mutual TLS when a client CA is given); None for plaintext."""
    if not config.tls_cert and not config.tls_key:
        if config.tls_client_ca:
            raise InvalidInputError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise InvalidInputError("TLS needs both --tls-cert and --tls-key")

    def read(path: str, what: str) -> bytes:
        try:
            return open(path, "rb").read()
        except OSError as exc:
            raise InvalidInputError(f"cannot read {what} {path}: {exc}") from exc

    client_ca = read(config.tls_client_ca, "client CA") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(config.tls_key, "TLS key"), read(config.tls_cert, "TLS certificate"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def start_server(config: ServerConfig, *, wait_ready: bool = False) -> RunningServer:
    """Bind, start serving (health NOT_SERVING), then load and warm the bundle in the background."""
    service = RetrievalService(config)
    message_bytes = config.max_message_mb * 1024 * 1024
    def init_worker() -> None:
        import faiss

        faiss.omp_set_num_threads(config.search_threads)  # OpenMP's thread count is per calling thread

    interceptors: list[grpc.ServerInterceptor] = [ErrorMappingInterceptor()]
    if config.tokens_file:
        interceptors.append(TokenAuthInterceptor(read_tokens(config.tokens_file)))
        if not config.tls_cert and config.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("bearer tokens without TLS travel in clear text; pass --tls-cert/--tls-key")
    credentials = _server_credentials(config)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="cbmir-rpc", initializer=init_worker),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=config.workers * 4,
    )
    pb_grpc.add_RetrievalServicer_to_server(service, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    server.start()
    ready = threading.Event()
    failure: list[BaseException] = []

    def load() -> None:
        try:
            service.load()
        except BaseException as exc:  # noqa: BLE001  (reported, server stays NOT_SERVING)
            failure.append(exc)
            log.error("cannot load index %s: %s", config.index, exc)
            ready.set()
            return
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        ready.set()

    threading.Thread(target=load, name="cbmir-load", daemon=True).start()
    running = RunningServer(server, port, service, health_servicer, ready)
    if wait_ready:
        ready.wait()
        if failure:
            running.stop(0)
            raise failure[0]
    return running


def serve_forever(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    running = start_server(config)
    log.info(json.dumps({"event": "listening", "host": config.host, "port": running.port}))
    print(f"cbmir serving {config.index} on {config.host}:{running.port}", flush=True)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info(json.dumps({"event": "shutdown", "signal": signum}))
        stopping.set()

    def reload(reason: str) -> None:
        if not running.ready.is_set():
            return
        try:
            running.service.load()
        except Exception as exc:  # noqa: BLE001  (keep serving the loaded version)
            log.error(json.dumps({"event": "reload_failed", "reason": reason, "error": str(exc)}))

    def watch() -> None:
        while not stopping.wait(config.watch_s):
            reload("watch")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload, args=("SIGHUP",), daemon=True).start())
    if config.watch_s > 0:
        threading.Thread(target=watch, name="cbmir-watch", daemon=True).start()
    stopping.wait()
    running.stop()
