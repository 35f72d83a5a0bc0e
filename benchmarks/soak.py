"""Bounded soak test: several loopback clients send a fixed number of mixed requests (image bytes, archive ids,
filters, re-ranking, batches) to a ``cbmir serve`` process, within a time bound; reports throughput, latency
percentiles, the error count and the server's resident memory after warm-up and at the end.

    python -m cbmir.benchmarks.soak --index bundles/mednist-fast --clients 8 --requests 4000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import psutil

from cbmir.client import RetrievalClient, build_request

from .common import add_io_args, closed_loop, environment, mednist_jpegs, percentiles, write_result
from .latency import start_server


def _requests(client: RetrievalClient, payloads: list[bytes], ids: list[str], methods: list[str], i: int) -> Any:
    """The i-th request of the mix; returns a callable issuing it."""
    kind = i % 5
    method = methods[i % len(methods)]
    if kind == 0:
        return lambda: client.search_image(payloads[i % len(payloads)], k=10, method=method)
    if kind == 1:
        return lambda: client.search_id(ids[i % len(ids)], k=20, method=method)
    if kind == 2 and len(methods) > 1:
        return lambda: client.search_image(
            payloads[i % len(payloads)], k=10, method=methods[0], rerank=methods[1], k_prep=50
        )
    if kind == 3:
        return lambda: client.search_batch(
            [build_request(archive_id=ids[(i + j) % len(ids)], k=5, method=method) for j in range(4)]
        )
    return lambda: client.search_id(ids[i % len(ids)], k=10, method=method, filters={"label": ["__none__", "x"]})


def soak(
    target: str,
    pid: int,
    payloads: list[bytes],
    ids: list[str],
    methods: list[str],
    *,
    clients: int,
    requests: int,
    warmup: int,
    max_seconds: float,
) -> dict[str, Any]:
    """Run the load; memory is the server process's RSS (MiB) after ``warmup`` requests and after the run."""
    server = psutil.Process(pid)

    def call(client: RetrievalClient, i: int) -> None:
        _requests(client, payloads, ids, methods, i)()

    closed_loop(target, clients, warmup, max_seconds, call)
    rss_before = server.memory_info().rss / 2**20
    latencies, errors, seconds = closed_loop(target, clients, requests, max_seconds, call)
    rss_after = server.memory_info().rss / 2**20
    return {
        "clients": clients,
        "requests_planned": requests,
        "requests_done": len(latencies) + len(errors),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(latencies) / seconds, 1),
        **percentiles(latencies or [0.0]),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "rss_mib_after_warmup": round(rss_before, 1),
        "rss_mib_after_run": round(rss_after, 1),
        "rss_growth_mib": round(rss_after - rss_before, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="bundles/mednist-fast")
    parser.add_argument("--methods", default="cnn,hog")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--workers", type=int, default=8)
    add_io_args(parser, "soak.json")
    args = parser.parse_args(argv)

    from cbmir.index_build import load_bundle

    ids = load_bundle(args.index, verify=False).ids
    payloads = mednist_jpegs(64, path=args.mednist)
    log_path = Path("logs") / "soak-server.log"
    log_path.parent.mkdir(exist_ok=True)
    proc, target = start_server(args.index, log_path, args.workers)
    try:
        result = soak(
            target,
            proc.pid,
            payloads,
            ids[:: max(1, len(ids) // 5000)],
            args.methods.split(","),
            clients=args.clients,
            requests=args.requests,
            warmup=args.warmup,
            max_seconds=args.max_seconds,
        )
    finally:
        proc.terminate()
        proc.wait(30)
    doc = {
        "soak": result,
        "index": args.index,
        "methods": args.methods,
        "environment": environment(),
        "command": "python -m cbmir.benchmarks.soak " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(write_result(args.out, doc))
    print(result)
    return doc


if __name__ == "__main__":
    main()
