import filecmp
import io
import os
import subprocess
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from cbmir.client import RetrievalClient, build_request
from cbmir.extractors.hog import HOGExtractor
from cbmir.extractors.imaging import decode_image
from cbmir.extractors.registry import register_extractor
from cbmir.index_build import build_bundle, load_bundle, open_archive
from cbmir.server.config import ServerConfig
from cbmir.server.query_expansion import QueryExpansion
from cbmir.server.reciprocal_rerank import ReciprocalRerank
from cbmir.server.search_engine import SearchEngine
from cbmir.server.startup import start_server
from tests.helpers import REPO, UNIFESP


@register_extractor("sleepy_hog")
class SleepyHOG(HOGExtractor):
    """HOG that takes ``delay`` seconds per call: makes cancellation, overload and readiness observable.

    ``started`` is set when a call begins, so a test knows a request is inside the server without sleeping.
    """

    delay = 0.0
    started = threading.Event()

    def extract(self, images):
        type(self).started.set()
        time.sleep(type(self).delay)
        return super().extract(images)


@pytest.fixture(scope="module")
def server(small_bundle):
    running = start_server(
        ServerConfig(index=str(small_bundle), port=0, max_k=50, workers=8, max_message_mb=2, device="cpu"),
        wait_ready=True,
    )
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with RetrievalClient(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def offline(small_bundle):
    return SearchEngine(load_bundle(small_bundle), device="cpu")


@pytest.fixture(scope="module")
def archive(unifesp_subset):
    root, labels = unifesp_subset
    return open_archive(root, labels)


def assert_same(hits, offline, rows, dists):
    valid = rows >= 0
    assert [h.id for h in hits] == [offline.bundle.ids[r] for r in rows[valid]]
    np.testing.assert_allclose([h.distance for h in hits], dists[valid], rtol=1e-4, atol=1e-4)
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))


def image_bytes(archive, i):
    return (Path(archive.source) / archive.entries[i].id).read_bytes()


@pytest.mark.parametrize("method", ["cnn", "hog", "bovw"])
def test_image_bytes_query_equals_offline_search(client, offline, archive, method):
    data = image_bytes(archive, 40)
    hits = client.search_image(data, k=7, method=method)
    q = offline.describe(method, [decode_image(data)])
    res = offline.search(method, q, 7)
    assert_same(hits, offline, res.rows[0], res.distances[0])
    assert hits[0].id == archive.entries[40].id  # the archived copy of the query image comes first
    assert hits[0].metadata["label"] == archive.entries[40].metadata["label"]


def test_raw_pixels_query_equals_offline_search(client, offline, archive):
    pixels = np.asarray(Image.open(Path(archive.source) / archive.entries[3].id).convert("L"))
    hits = client.search_pixels(pixels, k=5, method="hog")
    res = offline.search("hog", offline.describe("hog", [pixels.astype(np.float32) / 255.0]), 5)
    assert_same(hits, offline, res.rows[0], res.distances[0])


def test_archive_id_query_excludes_itself_unless_asked(client, offline, archive):
    ident = archive.entries[10].id
    row = offline.bundle.row_of[ident]
    hits = client.search_id(ident, k=6, method="cnn")
    res = offline.search("cnn", offline.method("cnn").descriptors[row : row + 1], 6, exclude=[np.array([row])])
    assert_same(hits, offline, res.rows[0], res.distances[0])
    with_self = client.search_id(ident, k=3, method="cnn", include_self=True)
    assert with_self[0].id == ident and with_self[0].distance == pytest.approx(0.0, abs=2e-3)


def test_query_expansion_over_grpc_equals_offline_and_checks_its_fields(client, offline, archive):
    ident = archive.entries[12].id
    row = offline.bundle.row_of[ident]
    query = offline.method("cnn").descriptors[row : row + 1]
    for alpha in (None, 0.0):
        hits = client.search_id(ident, k=6, method="cnn", expand=4, expand_alpha=alpha)
        expansion = QueryExpansion(4) if alpha is None else QueryExpansion(4, alpha)
        res = offline.search("cnn", query, 6, exclude=[np.array([row])], expansion=expansion)
        assert_same(hits, offline, res.rows[0], res.distances[0])
    plain = offline.search("cnn", query, 6, exclude=[np.array([row])])
    assert not np.allclose(res.distances, plain.distances), "expansion left the query where it was"
    for options, field in (({"expand": 51}, "50"), ({"expand_alpha": 2.0}, "expand_alpha needs expand")):
        with pytest.raises(grpc.RpcError) as err:
            client.search_id(ident, k=3, method="cnn", **options)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


def test_reciprocal_rerank_over_grpc_equals_offline_and_refuses_rerank_with_it(client, offline, archive):
    ident = archive.entries[30].id
    row = offline.bundle.row_of[ident]
    hits = client.search_id(ident, k=5, method="hog", reciprocal_k1=12)
    query = offline.method("hog").descriptors[row : row + 1]
    res = offline.search("hog", query, 5, exclude=[np.array([row])], reciprocal=ReciprocalRerank(12))
    assert_same(hits, offline, res.rows[0], res.distances[0])
    with pytest.raises(grpc.RpcError) as err:
        client.search_id(ident, k=5, method="hog", rerank="cnn", reciprocal_k1=12)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "replaces rerank" in err.value.details()


def test_vector_query_and_rerank_equal_offline(client, offline):
    v = offline.method("hog").descriptors[20]
    hits = client.search_vector(v, k=8, method="hog")
    res = offline.search("hog", v[None], 8)
    assert_same(hits, offline, res.rows[0], res.distances[0])
    cnn_v, hog_v = offline.method("cnn").descriptors[20], offline.method("hog").descriptors[20]
    hits = client.search_vector(cnn_v, k=5, method="cnn", rerank="hog", k_prep=30, rerank_vector=hog_v)
    res = offline.search("cnn", cnn_v[None], 5, rerank="hog", rerank_queries=hog_v[None], k_prep=30)
    assert_same(hits, offline, res.rows[0], res.distances[0])


def test_image_query_with_rerank_reports_rerank_distances(client, offline, archive):
    data = image_bytes(archive, 70)
    hits = client.search_image(data, k=5, method="cnn", rerank="hog", k_prep=25)
    img = decode_image(data)
    res = offline.search(
        "cnn", offline.describe("cnn", [img]), 5, rerank="hog", rerank_queries=offline.describe("hog", [img]), k_prep=25
    )
    assert_same(hits, offline, res.rows[0], res.distances[0])
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)


def test_filters_are_exact(client, offline, archive):
    labels = np.asarray(offline.bundle.metadata["label"])
    patients = np.asarray(offline.bundle.metadata["patient_id"])
    knee = np.flatnonzero(labels == "Knee")
    patient = patients[knee[0]]
    expected = {offline.bundle.ids[r] for r in np.flatnonzero((labels == "Knee") & (patients == patient))}
    hits = client.search_image(
        image_bytes(archive, 0), k=20, method="cnn", filters={"label": "Knee", "patient_id": patient}
    )
    assert {h.id for h in hits} == expected and len(hits) == len(expected) < 20
    many = client.search_image(image_bytes(archive, 0), k=25, method="hog", filters={"label": ["Knee", "Abdomen"]})
    assert len(many) == 25 and {h.metadata["label"] for h in many} <= {"Knee", "Abdomen"}
    allowed = offline.allowed_rows({"label": ["Knee", "Abdomen"]})
    res = offline.search("hog", offline.describe("hog", [decode_image(image_bytes(archive, 0))]), 25, allowed=allowed)
    assert_same(many, offline, res.rows[0], res.distances[0])


def test_search_batch_equals_single_searches(client, archive):
    requests = [
        build_request(image=image_bytes(archive, 1), k=4, method="cnn"),
        build_request(archive_id=archive.entries[2].id, k=6, method="hog"),
        build_request(image=image_bytes(archive, 3), k=4, method="cnn"),
        build_request(
            image=image_bytes(archive, 50), k=3, method="cnn", rerank="hog", k_prep=12, filters={"label": "Chest"}
        ),
    ]
    batched = client.search_batch(requests)
    singles = [client.search(r) for r in requests]
    for b, s in zip(batched, singles):
        assert [h.id for h in b] == [h.id for h in s]
        np.testing.assert_allclose([h.distance for h in b], [h.distance for h in s], rtol=1e-4, atol=1e-5)


def test_concurrent_clients_get_their_own_correct_answers(server, offline, archive):
    def one(i):
        with RetrievalClient(f"127.0.0.1:{server.port}") as c:
            data = image_bytes(archive, i)
            hits = c.search_image(data, k=5, method="hog")
            res = offline.search("hog", offline.describe("hog", [decode_image(data)]), 5)
            return [h.id for h in hits] == [offline.bundle.ids[r] for r in res.rows[0]]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(0, 90, 4)))


def test_index_info_and_health(client):
    info = client.index_info()
    assert info.count == 90 and info.max_k == 50 and info.default_method == "cnn"
    assert {(m.name, m.metric, m.dim) for m in info.methods} >= {("hog", "l1", 540), ("cnn", "l2", 1280)}
    assert "label" in info.filter_fields and info.version.startswith("v")
    assert client.health() == "SERVING" and client.health("cbmir.v1.Retrieval") == "SERVING"


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "cbmir.v1.Retrieval" in services and "grpc.health.v1.Health" in services


@pytest.mark.parametrize(
    ("kwargs", "code", "text"),
    [
        ({"image": b"definitely not an image"}, grpc.StatusCode.INVALID_ARGUMENT, "cannot decode"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "empty request"),
        ({"archive_id": "images/00000.png", "k": 51}, grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 50"),
        ({"archive_id": "images/00000.png", "method": "sift"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown method"),
        ({"archive_id": "images/00000.png", "rerank": "zzz"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown method"),
        (
            {"archive_id": "images/00000.png", "filters": {"colour": "red"}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown filter field",
        ),
        ({"vector": [0.1] * 7, "method": "hog"}, grpc.StatusCode.INVALID_ARGUMENT, "540-dimensional"),
        ({"vector": [float("nan")] * 540, "method": "hog"}, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        ({"vector": [0.1] * 1280, "method": "cnn", "rerank": "hog"}, grpc.StatusCode.INVALID_ARGUMENT, "rerank_vector"),
        (
            {"archive_id": "images/00000.png", "rerank": "hog", "k": 10, "k_prep": 5},
            grpc.StatusCode.INVALID_ARGUMENT,
            "k_prep",
        ),
        ({"archive_id": "no/such/image.png"}, grpc.StatusCode.NOT_FOUND, "not in index"),
        ({"pixels": np.zeros((1, 1), np.uint8)}, grpc.StatusCode.INVALID_ARGUMENT, "too small"),
    ],
)
def test_bad_requests_get_clear_status(client, kwargs, code, text):
    with pytest.raises(grpc.RpcError) as err:
        client.search(build_request(**kwargs))
    assert err.value.code() == code
    assert text in err.value.details()


def test_wrong_pixel_buffer_and_oversized_message(client):
    req = build_request(pixels=np.zeros((4, 4), np.uint8))
    req.pixels.data = b"\0" * 5
    with pytest.raises(grpc.RpcError) as err:
        client.search(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 16" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.search_image(b"\0" * (3 * 1024 * 1024))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_batch_errors_name_the_query(client, archive):
    with pytest.raises(grpc.RpcError) as err:
        client.search_batch([build_request(archive_id=archive.entries[0].id), build_request(archive_id="nope")])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "query 1" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.search_batch([build_request(archive_id=archive.entries[0].id)] * 65)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of 64" in err.value.details()


def test_server_survives_bad_requests(client, archive):
    assert client.search_image(image_bytes(archive, 5), k=3, method="hog")[0].id == archive.entries[5].id


# ------------------------------------------------------------------ slow-extractor server: timing behaviour
@pytest.fixture(scope="module")
def sleepy_bundle(unifesp_subset, tmp_path_factory):
    root, labels = unifesp_subset
    out = tmp_path_factory.mktemp("sleepy") / "bundle"
    SleepyHOG.delay = 0.0
    build_bundle(
        open_archive(root, labels).select({"label": "Knee"}),
        out,
        {"slow": {"extractor": "sleepy_hog"}},
        device="cpu",
        progress=False,
    )
    return out


def test_health_is_not_serving_until_warm_then_serving(sleepy_bundle, archive):
    SleepyHOG.delay = 1.5  # warm-up runs one extraction
    running = start_server(ServerConfig(index=str(sleepy_bundle), port=0, device="cpu", default_method="slow"))
    try:
        with RetrievalClient(f"127.0.0.1:{running.port}") as c:
            assert c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as err:
                c.search_image(image_bytes(archive, 0), k=3)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert running.ready.wait(20)
            assert c.health() == "SERVING"
    finally:
        SleepyHOG.delay = 0.0
        running.stop(0)


@pytest.fixture
def sleepy_server(sleepy_bundle):
    SleepyHOG.delay = 0.0
    running = start_server(
        ServerConfig(
            index=str(sleepy_bundle), port=0, device="cpu", workers=4, max_concurrent=1, default_method="slow"
        ),
        wait_ready=True,
    )
    SleepyHOG.delay = 1.0
    SleepyHOG.started.clear()
    yield running
    SleepyHOG.delay = 0.0
    running.stop(0)


def test_cancelled_stream_stops_server_work(sleepy_server, archive):
    stats = sleepy_server.service.stats
    with grpc.insecure_channel(f"127.0.0.1:{sleepy_server.port}") as channel:
        from cbmir.v1 import retrieval_pb2_grpc

        call = retrieval_pb2_grpc.RetrievalStub(channel).Search(build_request(image=image_bytes(archive, 0), k=5))
        assert SleepyHOG.started.wait(10), "the request never reached the extractor"
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.time() + 10
    while stats.cancelled < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert stats.cancelled == 1
    assert stats.searches == 0  # the search after the slow extraction never ran
    assert stats.hits_streamed == 0


def test_over_the_concurrency_bound_is_resource_exhausted(sleepy_server, archive):
    target = f"127.0.0.1:{sleepy_server.port}"
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(lambda: RetrievalClient(target).search_image(image_bytes(archive, 0), k=3))
        assert SleepyHOG.started.wait(10), "the first request never reached the extractor"
        with pytest.raises(grpc.RpcError) as err:
            RetrievalClient(target).search_image(image_bytes(archive, 1), k=3)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in err.value.details()
        assert len(first.result()) == 3
    assert sleepy_server.service.stats.rejected_overload == 1


def test_graceful_stop_lets_in_flight_stream_finish(sleepy_server, archive):
    target = f"127.0.0.1:{sleepy_server.port}"
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(lambda: RetrievalClient(target).search_image(image_bytes(archive, 2), k=4))
        assert SleepyHOG.started.wait(10), "the request never reached the extractor"
        sleepy_server.stop(grace=10)
        assert len(in_flight.result()) == 4


def test_generated_stubs_match_the_proto(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{REPO / 'proto'}",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--mypy_out={tmp_path}",
        f"--mypy_grpc_out={tmp_path}",
        str(REPO / "proto" / "cbmir" / "v1" / "retrieval.proto"),
    ]
    scripts = sysconfig.get_path("scripts")  # protoc-gen-mypy is installed beside this interpreter
    env = {**os.environ, "PATH": os.pathsep.join([scripts, os.path.dirname(sys.executable), os.environ["PATH"]])}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    names = ["retrieval_pb2.py", "retrieval_pb2.pyi", "retrieval_pb2_grpc.py", "retrieval_pb2_grpc.pyi"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "cbmir" / "v1", REPO / "cbmir" / "v1", names, shallow=False)
    assert not mismatch and not errors, f"stubs drifted from proto/: {mismatch or errors}; run 'make proto'"


def test_cli_query_prints_table_and_json(server, archive, capsys):
    from cbmir.cli import main

    image = str(Path(archive.source) / archive.entries[7].id)
    assert main(["query", "--target", f"127.0.0.1:{server.port}", "--image", image, "-k", "3", "--method", "hog"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["rank", "distance", "id"] and archive.entries[7].id in out
    assert (
        main(
            [
                "query",
                "--target",
                f"127.0.0.1:{server.port}",
                "--image",
                image,
                "-k",
                "2",
                "--json",
                "--filter",
                "label=Knee",
            ]
        )
        == 0
    )
    import json

    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and all(h["metadata"]["label"] == "Knee" for h in hits)


def test_serve_process_stops_gracefully_on_sigterm(small_bundle):
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "cbmir.cli", "serve", "--index", str(small_bundle), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read()
        target = line.strip().rsplit(" on ", 1)[1]
        with RetrievalClient(target, timeout=5) as c:
            deadline = time.time() + 60
            while c.health() != "SERVING" and time.time() < deadline:
                time.sleep(0.2)
            assert c.search_id("images/00000.png", k=2, method="hog")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert '"event": "shutdown"' in proc.stderr.read()
    finally:
        proc.kill()


def test_expired_deadline_stops_server_work(sleepy_server, archive):
    stats = sleepy_server.service.stats
    with RetrievalClient(f"127.0.0.1:{sleepy_server.port}", timeout=0.3) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.search_image(image_bytes(archive, 0), k=3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 10
    while stats.cancelled < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert stats.cancelled == 1 and stats.searches == 0


def test_thumbnails_by_id_through_the_archive_readers(server, small_bundle):
    client = RetrievalClient(f"127.0.0.1:{server.port}")
    bundle = load_bundle(small_bundle)
    ids = bundle.ids[:3]
    items = client.thumbnails([*ids, "no/such/id"], max_side=64)
    assert [t.id for t in items] == [*ids, "no/such/id"]
    for item, archive_id in zip(items[:3], ids):
        assert not item.error and max(item.width, item.height) == 64
        png = np.asarray(Image.open(io.BytesIO(item.png)))
        assert png.shape == (item.height, item.width) and png.dtype == np.uint8
        source = decode_image((UNIFESP / archive_id).read_bytes(), formats=("PNG",))
        assert abs(source.shape[1] / source.shape[0] - item.width / item.height) < 0.05
    assert items[3].error == "not in this index" and not items[3].png
    for bad, message in (([], "at least one id"), (["x"] * 65, "exceed the limit of 64"), (ids[:1], "max_side")):
        with pytest.raises(grpc.RpcError) as err:
            client.thumbnails(bad, max_side=4096 if message == "max_side" else 64)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    client.search_image((UNIFESP / ids[0]).read_bytes(), k=3, method="hog")
    assert {"decode", "extract", "search"} <= set(client.last_timings_ms)
