"""Opportunistic micro-batching of query descriptions across concurrent requests.

One worker thread per method takes every query that is waiting when it becomes free (up to ``max_batch``) and
describes them in one batched call. It never waits for a batch to fill, so a lone request pays nothing; under load,
requests that arrive while a batch runs share the next one, which turns many single-image forward passes into a few
batched ones.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np

from cbmir.timing import recording

Describe = Callable[[Sequence[np.ndarray]], np.ndarray]
Result = tuple[np.ndarray, dict[str, float]]


class MicroBatcher:
    """Serialises calls to ``describe`` for one method, batching whatever is queued.

    Futures resolve to ``(descriptors, stages)``: the request's rows and the stage milliseconds of the batch that
    produced them. If a batch fails, its requests are retried one by one so a bad query fails alone.

    Args:
        describe: images -> (N, D) descriptors.
        max_batch: most images per call.
        name: thread name suffix.
        on_batch: called with each batch's image count (the metrics' micro-batch histogram).
    """

    def __init__(
        self,
        describe: Describe,
        max_batch: int = 32,
        name: str = "describe",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._describe = describe
        self._on_batch = on_batch
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[list[np.ndarray], Future[Result]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"cbmir-batch-{name}", daemon=True)
        self._thread.start()

    def submit(self, images: list[np.ndarray]) -> Future[Result]:
        """Queue images; the future resolves to their (len(images), D) descriptors and the batch's stages."""
        future: Future[Result] = Future()
        with self._lock:
            if not self._closed:
                self._queue.put((images, future))
                return future
        self._process([(images, future)])  # closed (index swapped): describe on the caller's thread
        return future

    def close(self) -> None:
        """Finish what is queued, then stop; later submissions are described on the caller's thread."""
        with self._lock:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            pending = [item]
            count = len(item[0])
            while count < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                pending.append(nxt)
                count += len(nxt[0])
            self._process(pending)

    def _process(self, pending: list[tuple[list[np.ndarray], Future[Result]]]) -> None:
        images = [img for imgs, _ in pending for img in imgs]
        if self._on_batch is not None:
            self._on_batch(len(images))
        try:
            with recording() as stages:
                out = self._describe(images)
        except Exception as exc:
            if len(pending) > 1:
                for one in pending:
                    self._process([one])
            else:
                pending[0][1].set_exception(exc)
            return
        start = 0
        for imgs, future in pending:
            future.set_result((out[start : start + len(imgs)], dict(stages)))
            start += len(imgs)
