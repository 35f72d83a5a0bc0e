"""Live index updates: the server swaps in a new bundle version atomically (Reload RPC, SIGHUP, --watch)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from cbmir.client import RetrievalClient
from cbmir.index_build import add_to_bundle, build_bundle, load_bundle, open_archive, remove_from_bundle
from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server
from tests.helpers import subset_csv


@pytest.fixture()
def growing_bundle(unifesp_subset, tmp_path: Path):
    root, labels = unifesp_subset
    first = subset_csv(labels, tmp_path / "first.csv", slice(0, 60))
    second = subset_csv(labels, tmp_path / "second.csv", slice(60, 90))
    build_bundle(open_archive(root, first), tmp_path / "b", {"hog": {}}, device="cpu", progress=False)
    return tmp_path / "b", open_archive(root, second)


def test_reload_swaps_versions_without_failed_or_mixed_requests(growing_bundle) -> None:
    path, more = growing_bundle
    running = start_server(ServerConfig(index=str(path), port=0, device="cpu", max_k=100, workers=8), wait_ready=True)
    v1 = load_bundle(path)
    query = v1.methods["hog"].descriptors[0]
    answers: list[tuple[int, frozenset[str]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    answered = threading.Condition()

    def hammer() -> None:
        with RetrievalClient(f"127.0.0.1:{running.port}", timeout=30) as c:
            while not stop.is_set():
                try:
                    hits = c.search_vector(query, k=100, method="hog")
                    with answered:
                        answers.append((len(hits), frozenset(h.id for h in hits)))
                        answered.notify_all()
                except grpc.RpcError as exc:
                    errors.append(exc)

    def wait_for_answers(count: int, at_least: int = 8) -> None:
        """Block until the hammering clients got ``at_least`` answers from the version holding ``count`` ids."""
        with answered:
            assert answered.wait_for(lambda: sum(n == count for n, _ in answers) >= at_least, timeout=60), count

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        wait_for_answers(60)
        add_to_bundle(path, more, progress=False)
        v2 = load_bundle(path)
        with RetrievalClient(f"127.0.0.1:{running.port}", timeout=60) as c:
            reply = c.reload()
            assert reply.changed and reply.version == v2.version and reply.previous_version == v1.version
            assert reply.count == 90 and c.index_info().version == v2.version
            wait_for_answers(90)
            remove_from_bundle(path, v2.ids[:10])
            v3 = load_bundle(path)
            assert c.reload().version == v3.version
            assert not c.reload().changed
            wait_for_answers(80)
    finally:
        stop.set()
        for t in threads:
            t.join()
        running.stop(0)
    assert not errors, errors[:3]
    versions = {len(v1): frozenset(v1.ids), len(v2): frozenset(v2.ids), len(v3): frozenset(v3.ids)}
    seen = {n for n, _ in answers}
    assert seen == {60, 90, 80}, seen
    for n, ids in answers:
        assert ids == versions[n]


def test_failed_reload_keeps_serving_the_loaded_version(growing_bundle) -> None:
    path, more = growing_bundle
    running = start_server(ServerConfig(index=str(path), port=0, device="cpu"), wait_ready=True)
    try:
        v1 = load_bundle(path)
        add_to_bundle(path, more, progress=False)
        v2_dir = load_bundle(path).path
        with open(v2_dir / "hog.npy", "r+b") as fh:
            fh.seek(200)
            fh.write(b"\x00\x01\x02\x03")
        with RetrievalClient(f"127.0.0.1:{running.port}", timeout=30) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.reload()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "hog.npy" in err.value.details()
            assert c.index_info().version == v1.version
            assert len(c.search_id(v1.ids[0], k=5, method="hog")) == 5
    finally:
        running.stop(0)


@pytest.mark.parametrize("trigger", ["sighup", "watch"])
def test_serve_process_picks_up_new_versions(growing_bundle, trigger: str) -> None:
    path, more = growing_bundle
    extra = ["--watch", "0.5"] if trigger == "watch" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "cbmir.cli", "serve", "--index", str(path), "--port", "0", "--device", "cpu", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read()
        target = line.strip().rsplit(" on ", 1)[1]

        def wait_for(count: int) -> None:
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if c.index_info().count == count:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
            raise AssertionError(f"server never served {count} images")

        with RetrievalClient(target, timeout=10) as c:
            wait_for(60)
            add_to_bundle(path, more, progress=False)
            if trigger == "sighup":
                time.sleep(1.0)
                assert c.index_info().count == 60
                proc.send_signal(signal.SIGHUP)
            wait_for(90)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
