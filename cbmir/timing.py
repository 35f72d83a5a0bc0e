"""Per-request stage timings without threading a timer through every call.

A request opens a :func:`recording` scope; code anywhere below it in the same thread marks work with
``with stage("extract"):``. Outside a scope, :func:`stage` costs one attribute lookup.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_local = threading.local()


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Collect stage durations (milliseconds, summed per name) for the enclosed work in this thread."""
    previous = getattr(_local, "stages", None)
    stages: dict[str, float] = {}
    _local.stages = stages
    try:
        yield stages
    finally:
        _local.stages = previous


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the enclosed block's wall time to the current recording under ``name``."""
    stages = getattr(_local, "stages", None)
    if stages is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + (time.perf_counter() - t0) * 1000.0


def add_stages(stages: dict[str, float]) -> None:
    """Add durations measured elsewhere (another thread's batch) to the current recording, if any."""
    current = getattr(_local, "stages", None)
    if current is None:
        return
    for name, ms in stages.items():
        current[name] = current.get(name, 0.0) + ms
