"""Progress for steps that report none of their own (vocabulary fitting, index training, PCA)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

log = logging.getLogger("cbmir.progress")


@contextmanager
def progress_step(description: str, *, enabled: bool = True, tick_s: float = 0.5) -> Iterator[None]:
    """Show ``description`` with a running clock while the block runs, then one log line with its duration.

    With ``enabled`` false (``--no-progress``) only the start and end lines are logged.
    """
    log.info("%s ...", description)
    t0 = time.perf_counter()
    bar = tqdm(desc=description, bar_format="{desc}: {elapsed}", disable=not enabled, leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(tick_s):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()
    log.info("%s: done in %.1f s", description, time.perf_counter() - t0)
