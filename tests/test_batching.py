import threading
import time

import numpy as np
import pytest

from cbmir.server.batching import MicroBatcher
from cbmir.timing import stage


def slow_describe(calls):
    def describe(images):
        calls.append(len(images))
        with stage("extract"):
            time.sleep(0.05)
        if any(np.isnan(img).any() for img in images):
            raise ValueError("bad image")
        return np.stack([img.ravel()[:3] * 2 for img in images])

    return describe


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    calls = []
    batcher = MicroBatcher(slow_describe(calls), max_batch=32)
    images = [np.full((4, 4), i, np.float32) for i in range(12)]
    results = [None] * 12

    def worker(i):
        results[i] = batcher.submit([images[i]]).result(timeout=10)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (rows, stages) in enumerate(results):
        np.testing.assert_array_equal(rows, [[2 * i] * 3])
        assert stages["extract"] >= 40.0
    assert sum(calls) == 12 and len(calls) < 12  # at least one batch held several requests
    batcher.close()


def test_a_lone_request_is_not_delayed_and_a_bad_one_fails_alone():
    calls = []
    batcher = MicroBatcher(slow_describe(calls), max_batch=8)
    t0 = time.perf_counter()
    rows, _ = batcher.submit([np.ones((2, 2), np.float32)]).result(timeout=10)
    assert time.perf_counter() - t0 < 0.5 and rows.shape == (1, 3)
    blocker = batcher.submit([np.ones((2, 2), np.float32)])  # keeps the worker busy so the next two queue up
    bad = batcher.submit([np.full((2, 2), np.nan, np.float32)])
    good = batcher.submit([np.full((2, 2), 3.0, np.float32)])
    blocker.result(timeout=10)
    with pytest.raises(ValueError, match="bad image"):
        bad.result(timeout=10)
    np.testing.assert_array_equal(good.result(timeout=10)[0], [[6.0, 6.0, 6.0]])
    batcher.close()
