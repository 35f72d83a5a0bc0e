"""Admission control and accounting: the concurrency bound, cancellation, counters and one log line per request."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from cbmir.errors import OverloadedError
from cbmir.timing import recording

from .metrics import ServerMetrics
from .search_engine import SearchEngine
from .status import status_for

log = logging.getLogger("cbmir.server")


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


class Cancelled(Exception):
    """The client went away or its deadline passed; stop working."""


def check_active(context: grpc.ServicerContext) -> None:
    """Raise :class:`Cancelled` when the call is no longer active."""
    if not context.is_active():
        raise Cancelled()


class Admission:
    """At most ``limit`` requests run at once; the rest are refused with RESOURCE_EXHAUSTED at once."""

    def __init__(self, limit: int, metrics: ServerMetrics | None = None) -> None:
        self.limit = limit
        self.slots = threading.BoundedSemaphore(limit)
        self.stats = ServiceStats()
        self.metrics = metrics or ServerMetrics()

    def request(self, rpc: str, context: grpc.ServicerContext, engine: Callable[[], SearchEngine]) -> RequestScope:
        """A scope for one request: ``with admission.request(...) as (engine, record):``."""
        return RequestScope(self, rpc, context, engine)


class RequestScope:
    """Admission control, timing, cancellation accounting and the one structured log line per request."""

    def __init__(
        self, admission: Admission, rpc: str, context: grpc.ServicerContext, engine: Callable[[], SearchEngine]
    ) -> None:
        self.admission, self.rpc, self.context, self._engine = admission, rpc, context, engine
        self.record: dict[str, Any] = {"rpc": rpc, "peer": context.peer()}
        self._recording = recording()
        self._acquired = False

    def __enter__(self) -> tuple[SearchEngine, dict[str, Any]]:
        self.t0 = time.perf_counter()
        self.admission.stats.add("requests")
        engine = self._engine()
        if not self.admission.slots.acquire(blocking=False):
            self.admission.stats.add("rejected_overload")
            self.admission.metrics.rejected.labels(reason="overload").inc()
            raise OverloadedError(
                f"server is at its limit of {self.admission.limit} concurrent searches; retry with back-off"
            )
        self._acquired = True
        self.admission.metrics.in_flight.inc()
        self.stages = self._recording.__enter__()
        return engine, self.record

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        self._recording.__exit__(exc_type, exc, tb)
        if self._acquired:
            self.admission.slots.release()
            self.admission.metrics.in_flight.dec()
        status = "OK"
        suppress = False
        if isinstance(exc, Cancelled):
            self.admission.stats.add("cancelled")
            status, suppress = "CANCELLED", True
        elif exc is not None:
            code, _ = status_for(exc)
            self.admission.stats.error(code)
            status = code.name
        self.record.update(
            status=status,
            ms={
                **{k: round(v, 3) for k, v in self.stages.items()},
                "total": round((time.perf_counter() - self.t0) * 1000, 3),
            },
        )
        log.info(json.dumps(self.record, default=str))
        self.admission.metrics.finished(self.rpc, str(self.record.get("method") or ""), status, self.record["ms"])
        return suppress
