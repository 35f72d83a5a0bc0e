"""`/metrics` over HTTP after real requests: counts by RPC, method and status, stage histograms, gauges."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cbmir.client import RetrievalClient
from cbmir.index_build import load_bundle
from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server
from tests.helpers import real_png


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_real_requests(small_bundle: Path) -> None:
    running = start_server(ServerConfig(index=str(small_bundle), port=0, device="cpu", metrics_port=0), wait_ready=True)
    try:
        assert running.metrics_port
        client = RetrievalClient(f"127.0.0.1:{running.port}")
        for seed in range(3):
            client.search_image(real_png(seed), k=5, method="hog")
        client.search_id(load_bundle(small_bundle).ids[0], k=5, method="cnn")
        with pytest.raises(grpc.RpcError):
            client.search_image(b"not an image", k=5, method="hog")
        client.index_info()
        client.reload()
        m = scrape(running.metrics_port)
        assert m[("cbmir_requests_total", (("code", "OK"), ("method", "hog"), ("rpc", "Search")))] == 3
        assert m[("cbmir_requests_total", (("code", "OK"), ("method", "cnn"), ("rpc", "Search")))] == 1
        assert m[("cbmir_requests_total", (("code", "INVALID_ARGUMENT"), ("method", ""), ("rpc", "Search")))] == 1
        assert m[("cbmir_stage_seconds_count", (("rpc", "Search"), ("stage", "total")))] == 5
        assert m[("cbmir_stage_seconds_count", (("rpc", "Search"), ("stage", "search")))] == 4
        assert m[("cbmir_stage_seconds_count", (("rpc", "Search"), ("stage", "decode")))] == 4  # 3 images + bad
        assert m[("cbmir_micro_batch_images_count", (("method", "hog"),))] == 3
        assert m[("cbmir_index_images", ())] == 90
        version = load_bundle(small_bundle).version
        assert m[("cbmir_index_info", (("version", version),))] == 1
        assert m[("cbmir_reloads_total", (("result", "changed"),))] == 1
        assert m[("cbmir_reloads_total", (("result", "unchanged"),))] == 1
        assert m[("cbmir_in_flight_requests", ())] == 0
    finally:
        running.stop(0)
    with pytest.raises(OSError):  # the endpoint goes with the server
        urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=2)


def test_a_taken_metrics_port_is_a_clear_error(small_bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot bind the metrics port 127.0.0.1:{port}"):
            start_server(ServerConfig(index=str(small_bundle), port=0, device="cpu", metrics_port=port))
