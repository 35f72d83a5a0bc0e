"""Prometheus metrics of one server, in a registry of its own (two servers in one process never share counters).

Served over HTTP at ``/metrics`` by ``cbmir serve --metrics-port P``. Names:

- ``cbmir_requests_total{rpc, method, code}``: finished requests by RPC, search method and status code;
- ``cbmir_stage_seconds{rpc, stage}``: histogram of per-stage time (decode, preprocess, extract, search, rerank,
  queue, total);
- ``cbmir_in_flight_requests``: requests being served; ``cbmir_rejected_requests_total{reason}``: refused by
  admission control (``overload``);
- ``cbmir_micro_batch_images{method}``: histogram of images described per micro-batch;
- ``cbmir_index_images``, ``cbmir_index_info{version}``: the live version's size and name;
- ``cbmir_reloads_total{result}``: version swaps (``changed``, ``unchanged``, ``failed``);
- ``cbmir_ingested_images_total{status}``: items of AddImages streams (``added``, ``duplicate``, ``error``).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The counters, gauges and histograms of one server."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("cbmir_requests", "Finished requests", ["rpc", "method", "code"], registry=r)
        self.stage_seconds = Histogram(
            "cbmir_stage_seconds", "Time per request stage", ["rpc", "stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.in_flight = Gauge("cbmir_in_flight_requests", "Requests being served", registry=r)
        self.rejected = Counter("cbmir_rejected_requests", "Requests refused by admission", ["reason"], registry=r)
        self.micro_batch = Histogram(
            "cbmir_micro_batch_images", "Images per micro-batch", ["method"], buckets=BATCH_BUCKETS, registry=r
        )
        self.index_images = Gauge("cbmir_index_images", "Images in the served version", registry=r)
        self.index_info = Gauge("cbmir_index_info", "The served version (value 1)", ["version"], registry=r)
        self.reloads = Counter("cbmir_reloads", "Version swaps", ["result"], registry=r)
        self.ingested = Counter("cbmir_ingested_images", "Images of AddImages streams", ["status"], registry=r)

    def finished(self, rpc: str, method: str, code: str, stages_ms: Mapping[str, float]) -> None:
        """Count one finished request and observe its stage times (milliseconds, ``total`` included)."""
        self.requests.labels(rpc=rpc, method=method, code=code).inc()
        for stage, ms in stages_ms.items():
            self.stage_seconds.labels(rpc=rpc, stage=stage).observe(ms / 1000.0)

    def serving(self, version: str, count: int) -> None:
        """The live version changed to ``version`` with ``count`` images."""
        self.index_info.clear()
        self.index_info.labels(version=version).set(1)
        self.index_images.set(count)
