"""Property-based fuzzing of a live server: thousands of malformed requests and images must each get a proper
status (never INTERNAL/UNKNOWN, never a hang), and valid requests must be answered exactly as before."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbmir.client import build_request
from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server
from cbmir.v1 import retrieval_pb2 as pb
from cbmir.v1 import retrieval_pb2_grpc as pb_grpc
from tests.helpers import real_png

PROPER = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
SLOW_FUZZ = settings(max_examples=4000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
"""The slow set's scale: 4,000 images + 4,000 requests (each also in a SearchBatch) + 2,000 raw payloads."""
SLOW_FUZZ_RAW = settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
FUZZ = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def png_bytes(width: int, height: int, payload: bytes = b"") -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (valid CRCs) with whatever pixel data follows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def fuzz_target(small_bundle: Path):
    running = start_server(
        ServerConfig(
            index=str(small_bundle),
            port=0,
            device="cpu",
            max_message_mb=2,
            max_pixels=4_000_000,
            workers=4,
            default_method="hog",
        ),
        wait_ready=True,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.RetrievalStub(channel)
    baseline = _valid_answer(stub)
    yield running, stub, baseline
    assert _valid_answer(stub) == baseline, "valid requests answer differently after fuzzing"
    assert "INTERNAL" not in running.service.stats.errors and "UNKNOWN" not in running.service.stats.errors
    channel.close()
    running.stop(0)


def _valid_answer(stub) -> list[tuple[str, float]]:
    hits = list(stub.Search(build_request(image=real_png(0), k=5, method="hog"), timeout=30))
    return [(h.id, round(h.distance, 5)) for h in hits]


def _status(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _search(stub, request: pb.SearchRequest) -> grpc.StatusCode:
    return _status(lambda: list(stub.Search(request, timeout=20)))


corrupt_images = st.one_of(
    st.binary(max_size=2048),
    st.integers(0, 2000).map(lambda n: real_png(1)[:n]),
    st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.binary(max_size=64)).map(
        lambda t: png_bytes(*t)
    ),
    st.binary(max_size=512).map(lambda b: b"\x00" * 128 + b"DICM" + b),
    st.binary(max_size=256).map(lambda b: b"\xff\xd8\xff\xe0" + b),
    st.tuples(st.integers(0, 3000), st.binary(min_size=1, max_size=8)).map(
        lambda t: real_png(2)[: t[0]] + t[1] + real_png(2)[t[0] + len(t[1]) :]
    ),
)


def _check_corrupt_image(fuzz_target, image: bytes, method: str) -> None:
    _, stub, _ = fuzz_target
    assert _search(stub, build_request(image=image, k=3, method=method)) in PROPER


IMAGE_CASES = given(image=corrupt_images, method=st.sampled_from(["hog", "cnn", "bovw", ""]))
test_corrupt_images_get_proper_statuses = FUZZ(IMAGE_CASES(_check_corrupt_image))
test_corrupt_images_at_scale = pytest.mark.slow(SLOW_FUZZ(IMAGE_CASES(_check_corrupt_image)))


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)
pixel_arrays = st.builds(
    pb.PixelArray,
    width=st.integers(0, 2**32 - 1),
    height=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(["uint8", "uint16", "float32", "int64", "", "float64", "uint8 "]),
    data=st.binary(max_size=4096),
)
requests = st.builds(
    pb.SearchRequest,
    k=st.integers(0, 2**32 - 1),
    method=st.sampled_from(["", "hog", "cnn", "bovw", "nope", "cnn+hog", "\x00"]),
    rerank=st.sampled_from(["", "hog", "cnn", "bovw", "missing"]),
    k_prep=st.integers(0, 2**32 - 1),
    filters=st.lists(
        st.builds(
            pb.MetadataFilter,
            field=st.sampled_from(["label", "patient_id", "", "x"]),
            values=st.lists(st.text(max_size=8), max_size=3),
        ),
        max_size=3,
    ),
    exclude_ids=st.lists(st.text(max_size=20), max_size=5),
    include_self=st.booleans(),
    predict_class=st.booleans(),
    min_class_confidence=finite_or_not,
    class_vote=st.integers(0, 2**32 - 1),
    group_by=st.sampled_from(["", "patient_id", "label", "nope", "x" * 300]),
    group_size=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2**32 - 1),
    fusion=st.sampled_from(["", "min", "rrf", "avg"]),
)


REQUEST_CASES = given(
    request=requests,
    query=st.one_of(
        st.builds(lambda v: {"vector": pb.Vector(values=v)}, st.lists(finite_or_not, max_size=300)),
        st.builds(lambda p: {"pixels": p}, pixel_arrays),
        st.builds(lambda s: {"archive_id": s}, st.one_of(st.text(max_size=30), st.just("images/00000.png"))),
        st.builds(lambda s: {"archive_id": s}, st.text(min_size=1000, max_size=30_000)),
        st.builds(lambda d, s: {"archive_id": s, "max_distance": d}, finite_or_not, st.just("images/00000.png")),
        st.builds(lambda imgs: {"study_images": imgs}, st.lists(st.binary(max_size=64), max_size=40)),
        st.just({}),
    ),
)


def _check_malformed_request(fuzz_target, request: pb.SearchRequest, query: dict) -> None:
    _, stub, _ = fuzz_target
    for field, value in query.items():
        if field == "max_distance":
            request.max_distance = value
        elif field == "study_images":
            request.study_images.extend(value)
        elif isinstance(value, str):
            setattr(request, field, value)
        else:
            getattr(request, field).CopyFrom(value)
    assert _search(stub, request) in PROPER
    batch = pb.SearchBatchRequest(queries=[request, request])
    assert _status(lambda: list(stub.SearchBatch(batch, timeout=20))) in PROPER


test_malformed_requests_get_proper_statuses = FUZZ(REQUEST_CASES(_check_malformed_request))
test_malformed_requests_at_scale = pytest.mark.slow(SLOW_FUZZ(REQUEST_CASES(_check_malformed_request)))


RAW_METHODS = [
    ("/cbmir.v1.Retrieval/Search", "unary_stream", pb.SearchRequest),
    ("/cbmir.v1.Retrieval/SearchBatch", "unary_stream", pb.SearchBatchRequest),
    ("/cbmir.v1.Retrieval/GetIndexInfo", "unary_unary", pb.GetIndexInfoRequest),
    ("/cbmir.v1.Retrieval/Reload", "unary_unary", pb.ReloadRequest),
    ("/cbmir.v1.Retrieval/GetThumbnails", "unary_unary", pb.ThumbnailsRequest),
]


RAW_CASES = given(payload=st.binary(min_size=1, max_size=512), which=st.integers(0, len(RAW_METHODS) - 1))


def _check_raw_bytes(fuzz_target, payload: bytes, which: int) -> None:
    running, _, _ = fuzz_target
    method, shape, message = RAW_METHODS[which]
    try:
        message.FromString(payload)
        return  # parses as that method's message (protobuf accepts much as an empty message): not this test's case
    except Exception:
        pass
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = getattr(channel, shape)(method)  # no serializer: the payload goes out as it is
        with pytest.raises(grpc.RpcError) as err:
            result = call(payload, timeout=30)
            list(result) if shape == "unary_stream" else result
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "not a valid protobuf message" in err.value.details()


test_raw_bytes_that_are_no_message_are_invalid_argument = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)(RAW_CASES(_check_raw_bytes))
test_raw_bytes_at_scale = pytest.mark.slow(SLOW_FUZZ_RAW(RAW_CASES(_check_raw_bytes)))


LONG = "x" * 20_000 + "' or 1==1 --"


@pytest.mark.parametrize(
    "request_fields",
    [
        {"archive_id": LONG},
        {"archive_id": "a", "method": LONG},
        {"archive_id": "a", "rerank": LONG},
        {"archive_id": "a", "filters": [pb.MetadataFilter(field=LONG, values=["v"])]},
        {"archive_id": "a", "filters": [pb.MetadataFilter(field="label", values=[LONG])]},
        {"archive_id": "a", "exclude_ids": [LONG]},
        {"pixels": pb.PixelArray(width=2, height=2, dtype=LONG, data=b"\0" * 4)},
        {"archive_id": "y" * 1000},  # within the input limit: echoed, but cut to 100 characters
    ],
)
def test_oversized_strings_are_refused_and_never_echoed_whole(fuzz_target, request_fields: dict) -> None:
    _, stub, _ = fuzz_target
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Search(pb.SearchRequest(k=3, **request_fields), timeout=30))
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert len(err.value.details()) < 400, err.value.details()[:500]
