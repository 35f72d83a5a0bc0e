"""What every benchmark records beside its figures: commit, versions, hardware, threads; and small helpers."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from cbmir.extractors.runtimes import runtime_versions
from cbmir.machine import cpu_model

RESULTS_DIR = "benchmarks/results"
"""Where the scripts write their result files by default (relative to the working directory)."""


def default_mednist_zip() -> str:
    """The MedNIST zip under ``$CBMIR_SHARED_DATA`` (default ``../shared/data``, beside a checkout)."""
    return str(Path(os.environ.get("CBMIR_SHARED_DATA", "../shared/data")) / "mednist" / "mednist_58954_jpeg.zip")


def add_io_args(parser: argparse.ArgumentParser, result_name: str) -> None:
    """``--out`` (the result file) and ``--mednist`` (the query images' zip), shared by every script."""
    parser.add_argument("--out", default=f"{RESULTS_DIR}/{result_name}", help="result JSON file to write")
    parser.add_argument("--mednist", default=default_mednist_zip(), help="MedNIST JPEG zip the queries come from")


def environment() -> dict[str, Any]:
    """Versions, hardware and the git commit of the working directory, recorded beside every figure."""
    import faiss
    import timm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "faiss": faiss.__version__,
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "runtimes": runtime_versions(),
        "platform": platform.platform(),
    }


def percentiles(values_ms: list[float]) -> dict[str, float]:
    a = np.asarray(values_ms, dtype=np.float64)
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 3) for q in (50, 95, 99)}


def mednist_jpegs(n: int, seed: int = 0, path: str | None = None) -> list[bytes]:
    """``n`` JPEG files sampled evenly from the MedNIST zip (all six classes)."""
    path = path or default_mednist_zip()
    with zipfile.ZipFile(path) as zf:
        names = sorted(x for x in zf.namelist() if x.endswith(".jpeg"))
        picked = np.random.default_rng(seed).choice(len(names), size=n, replace=False)
        return [zf.read(names[i]) for i in sorted(picked)]


def write_result(out: str, doc: dict[str, Any]) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path


def closed_loop(
    target: str, clients: int, requests: int, max_seconds: float, call: Callable[[Any, int], None]
) -> tuple[list[float], list[str], float]:
    """Drive a server with ``clients`` threads, each issuing the next of ``requests`` numbered calls until all are
    done or ``max_seconds`` pass; ``call(client, i)`` makes call ``i``.

    Returns:
        Milliseconds of the calls that succeeded, ``"CODE: details"`` of those that failed with a gRPC status, and
        the wall time. Any other exception propagates.
    """
    from cbmir.client import RetrievalClient

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        with RetrievalClient(target, timeout=60) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    call(client, i)
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    return latencies, errors, time.perf_counter() - t0
