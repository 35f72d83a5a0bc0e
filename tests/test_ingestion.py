"""Ingestion over the API: per-item results, durable and searchable acknowledgements, SIGKILL at random moments."""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from cbmir.cli import main
from cbmir.client import IngestItem, RetrievalClient
from cbmir.index_build import build_bundle, load_bundle, open_archive
from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server
from cbmir.v1 import retrieval_pb2 as pb
from cbmir.v1 import retrieval_pb2_grpc as pb_grpc
from tests.helpers import UNIFESP, require, serve_subprocess


def unifesp_rows() -> list[dict[str, str]]:
    with open(require(UNIFESP) / "labels.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["single_label"] == "1"]


@pytest.fixture()
def hog_bundle(tmp_path: Path) -> Path:
    rows = unifesp_rows()[:20]
    labels = tmp_path / "first.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    build_bundle(open_archive(UNIFESP, labels), tmp_path / "b", {"hog": {}}, device="cpu", progress=False)
    return tmp_path / "b"


def new_images(start: int, count: int) -> list[tuple[str, bytes]]:
    return [(f"ingest/{r['path']}", (UNIFESP / r["path"]).read_bytes()) for r in unifesp_rows()[start : start + count]]


def test_add_and_remove_over_the_api(hog_bundle: Path, tmp_path: Path) -> None:
    running = start_server(ServerConfig(index=str(hog_bundle), port=0, device="cpu"), wait_ready=True)
    try:
        client = RetrievalClient(f"127.0.0.1:{running.port}")
        fresh = new_images(100, 3)
        ((_, other),) = new_images(110, 1)
        existing = load_bundle(hog_bundle).ids[0]
        items = [IngestItem(i, image=data, metadata={"label": "new", "patient_id": "p1"}) for i, data in fresh]
        items += [
            IngestItem("copy-of-first", image=(UNIFESP / existing).read_bytes()),  # pixels already indexed
            IngestItem(existing, image=other),  # an indexed id with other pixels
            IngestItem("broken", image=b"not an image"),
            IngestItem("plain-pixels", pixels=(np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)),
        ]
        reply = client.add_images(items)
        statuses = [(r.id, r.status) for r in reply.results]
        assert statuses == [
            (fresh[0][0], "added"),
            (fresh[1][0], "added"),
            (fresh[2][0], "added"),
            ("copy-of-first", "duplicate"),
            (existing, "error"),
            ("broken", "error"),
            ("plain-pixels", "added"),
        ]
        assert "already indexed with other pixels" in reply.results[4].error
        assert "cannot decode" in reply.results[5].error
        assert reply.count == 24 and client.index_info().version == reply.version
        for archive_id, data in fresh:  # searchable right after the ack, with its metadata
            top = client.search_image(data, k=1, method="hog")[0]
            assert top.id == archive_id and top.distance == pytest.approx(0.0, abs=1e-3)
            assert top.metadata["label"] == "new"
        assert len(client.search_image(fresh[0][1], k=30, method="hog", filters={"label": "new"})) == 3
        assert main(["info", "--index", str(hog_bundle)]) == 0
        removed = client.remove_images([fresh[0][0]])
        assert list(removed.removed) == [fresh[0][0]] and removed.count == 23
        assert client.search_image(fresh[0][1], k=1, method="hog")[0].id != fresh[0][0]
        with pytest.raises(grpc.RpcError) as err:
            client.remove_images(["no/such/id"])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            client.add_images(IngestItem(f"x{i}", image=b"x") for i in range(1001))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than 1000" in err.value.details()
        assert len(load_bundle(hog_bundle)) == 23  # the refused stream wrote nothing
    finally:
        running.stop(0)


def test_ingestion_needs_an_admin_token(hog_bundle: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("search search-token-0123456789\nadmin admin-token-0123456789\n")
    running = start_server(
        ServerConfig(index=str(hog_bundle), port=0, device="cpu", tokens_file=str(tokens)), wait_ready=True
    )
    try:
        ((archive_id, data),) = new_images(120, 1)
        searcher = RetrievalClient(f"127.0.0.1:{running.port}", token="search-token-0123456789")
        for call in (
            lambda: searcher.add_images([IngestItem(archive_id, image=data)]),
            lambda: searcher.remove_images([archive_id]),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        admin = RetrievalClient(f"127.0.0.1:{running.port}", token="admin-token-0123456789")
        assert [r.status for r in admin.add_images([IngestItem(archive_id, image=data)]).results] == ["added"]
    finally:
        running.stop(0)


def _kill_during_ingestion(bundle: Path, kills: int) -> None:
    rng = np.random.default_rng(int(os.environ.get("CBMIR_KILL_SEED", "11")))
    images = new_images(200, 4 * kills + 8)
    sent = {archive_id for archive_id, _ in images}
    acknowledged: dict[str, bytes] = {}
    cursor = 0
    for _ in range(kills):
        proc, target = serve_subprocess(bundle)
        stop = threading.Event()

        def feed(target: str = target, stop: threading.Event = stop) -> None:
            nonlocal cursor
            client = RetrievalClient(target, timeout=60)
            while not stop.is_set() and cursor < len(images):
                batch = images[cursor : cursor + 2]
                cursor += 2
                try:
                    reply = client.add_images(IngestItem(i, image=d) for i, d in batch)
                except grpc.RpcError:
                    return
                acknowledged.update({r.id: dict(batch)[r.id] for r in reply.results if r.status == "added"})

        thread = threading.Thread(target=feed)
        thread.start()
        time.sleep(float(rng.uniform(0.2, 3.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        thread.join(60)
        assert main(["info", "--index", str(bundle)]) == 0  # the live version loads and verifies
        ids = set(load_bundle(bundle).ids)
        assert ids - set(load_bundle(bundle).ids[:20]) <= sent  # whole images only: nothing half-present
    proc, target = serve_subprocess(bundle)
    try:
        client = RetrievalClient(target, timeout=60)
        assert acknowledged, "no stream was acknowledged before the kills"
        for archive_id, data in acknowledged.items():
            assert client.search_image(data, k=1, method="hog")[0].id == archive_id, archive_id
    finally:
        proc.terminate()
        proc.wait(30)


def test_sigkill_during_ingestion_keeps_every_acknowledged_image(hog_bundle: Path) -> None:
    _kill_during_ingestion(hog_bundle, kills=3)


@pytest.mark.slow
def test_twenty_sigkills_during_ingestion(hog_bundle: Path) -> None:
    _kill_during_ingestion(hog_bundle, kills=20)


def test_cli_add_and_remove_with_target(hog_bundle: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "new"
    folder.mkdir()
    for archive_id, data in new_images(130, 3):
        (folder / Path(archive_id).name).write_bytes(data)
    (folder / "broken.png").write_bytes(b"\x89PNG nothing")
    running = start_server(ServerConfig(index=str(hog_bundle), port=0, device="cpu"), wait_ready=True)
    target = f"127.0.0.1:{running.port}"
    try:
        assert main(["add", "--target", target, "--images", str(folder), "--id-prefix", "cli/"]) == 1
        out = capsys.readouterr()
        assert "3 added, 0 already indexed, 1 refused" in out.out and "cli/broken.png" in out.err
        assert RetrievalClient(target).index_info().count == 23
        name = sorted(p.name for p in folder.iterdir() if p.name != "broken.png")[0]
        assert main(["remove", "--target", target, "--ids", f"cli/{name}"]) == 0
        assert "22 images (1 removed)" in capsys.readouterr().out
        assert main(["add", "--images", str(folder)]) == 2  # neither --index nor --target
        assert "--index BUNDLE" in capsys.readouterr().err
    finally:
        running.stop(0)


def test_a_stream_that_breaks_mid_way_writes_nothing(hog_bundle: Path) -> None:
    running = start_server(ServerConfig(index=str(hog_bundle), port=0, device="cpu"), wait_ready=True)
    try:
        client = RetrievalClient(f"127.0.0.1:{running.port}")
        version = client.index_info().version

        def breaking():
            for archive_id, data in new_images(140, 2):
                yield IngestItem(archive_id, image=data)
            raise RuntimeError("the client died mid-stream")

        with pytest.raises((grpc.RpcError, RuntimeError)):
            client.add_images(breaking())
        time.sleep(0.5)  # let the server notice the cancelled stream
        assert client.index_info().version == version and len(load_bundle(hog_bundle)) == 20
    finally:
        running.stop(0)


def test_only_a_stream_closed_by_its_end_marker_is_written(hog_bundle: Path) -> None:
    running = start_server(ServerConfig(index=str(hog_bundle), port=0, device="cpu"), wait_ready=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RetrievalStub(channel)
            (first, second) = [pb.AddImageRequest(id=i, image=data) for i, data in new_images(150, 2)]
            version = stub.GetIndexInfo(pb.GetIndexInfoRequest()).version
            refused = {
                "no end marker": [first, second],
                "a message after the end marker": [first, pb.AddImageRequest(end_of_stream=True), second],
            }
            for why, stream in refused.items():
                with pytest.raises(grpc.RpcError) as raised:
                    stub.AddImages(iter(stream), timeout=30)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
                assert "end_of_stream" in raised.value.details() and "nothing was written" in raised.value.details()
                assert stub.GetIndexInfo(pb.GetIndexInfoRequest()).version == version, why
            marked_last = pb.AddImageRequest()
            marked_last.CopyFrom(second)
            marked_last.end_of_stream = True
            reply = stub.AddImages(iter([first, marked_last]), timeout=30)
        assert [(r.id, r.status) for r in reply.results] == [(first.id, "added"), (second.id, "added")]
        assert len(load_bundle(hog_bundle)) == 22
    finally:
        running.stop(0)
