"""Per-request stage timings without threading a timer through every call.

A request opens a :func:`recording` scope; code anywhere below it in the same context (thread) marks work with
``with stage("extract"):``. Outside a scope, :func:`stage` costs one context-variable lookup. The recording lives
in a :class:`contextvars.ContextVar`, so concurrent requests never see each other's timings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_STAGES: ContextVar[dict[str, float] | None] = ContextVar("cbmir_stages", default=None)


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Collect stage durations (milliseconds, summed per name) for the enclosed work in this thread."""
    stages: dict[str, float] = {}
    token = _STAGES.set(stages)
    try:
        yield stages
    finally:
        _STAGES.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the enclosed block's wall time to the current recording under ``name``."""
    stages = _STAGES.get()
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
    current = _STAGES.get()
    if current is None:
        return
    for name, ms in stages.items():
        current[name] = current.get(name, 0.0) + ms
