"""End-to-end latency through gRPC: image bytes in, top-10 out, against a ``cbmir serve`` subprocess.

    python -m cbmir.benchmarks.latency --index bundles/mednist-fast [--requests 200] [--seconds 30]

For each method (cnn, hog, bovw, cnn+hog) and concurrency (1, 8) it sends a bounded number of requests (stopping
early at ``--seconds``) after a warm-up, and reports client-side p50/p95/p99 and the server's per-stage medians,
parsed from its one-JSON-line-per-request log; ``transport`` is client latency minus server time. The reference
pipeline (SqueezeNet, one image per pass, NumPy scan and argsort over an archive of the same size) is timed on the
same images in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cbmir.client import RetrievalClient, build_request
from cbmir.index_build.bundle import read_manifest, resolve_version_dir

from .common import add_io_args, closed_loop, environment, mednist_jpegs, percentiles, write_result
from .reference_pipeline import ReferencePipeline

METHODS: dict[str, dict[str, Any]] = {
    "cnn": {"method": "cnn"},
    "hog": {"method": "hog"},
    "bovw": {"method": "bovw"},
    "cnn+hog": {"method": "cnn", "rerank": "hog", "k_prep": 50},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(index: str, log_path: Path, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "cbmir.cli",
        "serve",
        "--index",
        index,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--max-concurrent",
        str(workers),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
    target = f"127.0.0.1:{port}"
    deadline = time.time() + 300
    with RetrievalClient(target, timeout=2) as client:
        while time.time() < deadline:
            try:
                if client.health() == "SERVING":
                    return proc, target
            except Exception:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
    raise TimeoutError("server did not become SERVING")


def server_records(log_path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    with open(log_path) as fh:
        fh.seek(offset)
        text = fh.read()
        end = fh.tell()
    records = []
    for line in text.splitlines():
        brace = line.find('{"rpc"')
        if brace >= 0:
            records.append(json.loads(line[brace:]))
    return records, end


def run_load(
    target: str, payloads: list[bytes], options: dict[str, Any], concurrency: int, requests: int, seconds: float
) -> list[float]:
    """Milliseconds per image query at the given concurrency; any failed or short answer aborts the run."""

    def call(client: RetrievalClient, i: int) -> None:
        hits = client.search(build_request(image=payloads[i % len(payloads)], k=10, **options))
        if len(hits) != 10:
            raise RuntimeError(f"expected 10 hits, got {len(hits)}")

    latencies, errors, _ = closed_loop(target, concurrency, requests, seconds, call)
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return latencies


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="bundles/mednist-fast")
    parser.add_argument("--bovw-index", help="bundle to serve for the bovw runs (default: --index)")
    parser.add_argument("--methods", default="cnn,hog,bovw,cnn+hog")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--requests", type=int, default=200, help="per method and concurrency")
    parser.add_argument("--seconds", type=float, default=25.0, help="time cap per method and concurrency")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--baseline-requests", type=int, default=30)
    parser.add_argument("--workers", type=int, default=8)
    add_io_args(parser, "latency.json")
    args = parser.parse_args(argv)

    manifest = read_manifest(resolve_version_dir(args.index))
    payloads = mednist_jpegs(256, seed=1, path=args.mednist)

    baseline = ReferencePipeline(archive_size=manifest["count"])
    for p in payloads[:3]:
        baseline.query(p)
    base_ms = []
    for p in payloads[: args.baseline_requests]:
        t0 = time.perf_counter()
        baseline.query(p)
        base_ms.append((time.perf_counter() - t0) * 1000)
    base = percentiles(base_ms)
    del baseline
    print(f"reference pipeline over {manifest['count']} images: p50 {base['p50_ms']:.1f} ms")

    runs = []
    plan: dict[str, list[str]] = {}
    for name in args.methods.split(","):
        plan.setdefault(args.bovw_index if name == "bovw" and args.bovw_index else args.index, []).append(name)
    for index, names in plan.items():
        runs += measure(index, names, payloads, args, base)
    doc = {
        "runs": runs,
        "meta": {
            **environment(),
            "bundle": args.index,
            "bovw_bundle": args.bovw_index,
            "archive_count": manifest["count"],
            "methods": {n: {k: m[k] for k in ("config", "dim", "metric")} for n, m in manifest["methods"].items()},
            "baseline": {
                "pipeline": "squeezenet1_0 256px batch 1 + numpy L2 scan + argsort",
                **base,
                "requests": len(base_ms),
            },
            "server_workers": args.workers,
            "cpu_count": os.cpu_count(),
        },
    }
    print(f"wrote {write_result(args.out, doc)}")
    return doc


def measure(
    index: str, names: list[str], payloads: list[bytes], args: argparse.Namespace, base: dict[str, float]
) -> list[dict[str, Any]]:
    """Serve ``index`` in a subprocess and measure each method at each concurrency."""
    manifest = read_manifest(resolve_version_dir(index))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        proc, target = start_server(index, log_path, args.workers)
        try:
            offset = 0
            for name in names:
                options = METHODS[name]
                if options["method"] not in manifest["methods"]:
                    print(f"skip {name}: not in {index}")
                    continue
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    run_load(target, payloads, options, concurrency, args.warmup, args.seconds)
                    _, offset = server_records(log_path, offset)
                    t0 = time.perf_counter()
                    lat = run_load(target, payloads, options, concurrency, args.requests, args.seconds)
                    wall = time.perf_counter() - t0
                    time.sleep(0.2)
                    records, offset = server_records(log_path, offset)
                    stages: dict[str, float] = {}
                    for key in ("decode", "queue", "preprocess", "extract", "search", "rerank", "total"):
                        values = [r["ms"][key] for r in records if key in r.get("ms", {})]
                        if values:
                            stages[key] = round(float(np.median(values)), 3)
                    stages["transport"] = round(float(np.median(lat)) - stages.get("total", 0.0), 3)
                    pct = percentiles(lat)
                    run = {
                        "method": name,
                        "bundle": index,
                        "concurrency": concurrency,
                        "requests": len(lat),
                        **pct,
                        "throughput_rps": round(len(lat) / wall, 1),
                        "stages_ms": stages,
                        "baseline_p50_ms": base["p50_ms"],
                        "speedup_p50": round(base["p50_ms"] / pct["p50_ms"], 1),
                    }
                    runs.append(run)
                    print(
                        f"{name:<8} c={concurrency}: p50 {pct['p50_ms']:7.2f}  p95 {pct['p95_ms']:7.2f}  "
                        f"p99 {pct['p99_ms']:7.2f} ms  {run['throughput_rps']:6.1f} req/s  "
                        f"{run['speedup_p50']:5.1f}x baseline  stages {stages}"
                    )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return runs


if __name__ == "__main__":
    main()
