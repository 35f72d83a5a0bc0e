"""A short bounded soak of a real ``cbmir serve`` process: zero errors and no memory growth."""

from __future__ import annotations

from pathlib import Path

from cbmir.benchmarks.latency import start_server
from cbmir.benchmarks.soak import soak
from cbmir.index_build import load_bundle
from tests.helpers import real_png


def test_bounded_soak_has_no_errors_and_no_leak(small_bundle: Path, tmp_path: Path) -> None:
    ids = load_bundle(small_bundle).ids
    proc, target = start_server(str(small_bundle), tmp_path / "server.log", workers=4)
    try:
        result = soak(
            target,
            proc.pid,
            [real_png(i) for i in range(8)],
            ids,
            ["hog", "cnn"],
            clients=4,
            requests=1200,
            warmup=300,
            max_seconds=240,
        )
    finally:
        proc.terminate()
        proc.wait(30)
    assert result["errors"] == 0, result["error_examples"]
    assert result["requests_done"] == 1200
    assert result["rss_growth_mib"] < 32, result
