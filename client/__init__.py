"""A small client other services can import: ``RetrievalClient("host:port").search_image(png_bytes, k=10)``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbmir.errors import CbmirError, InvalidInputError
from cbmir.v1 import retrieval_pb2 as pb
from cbmir.v1 import retrieval_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # numpy is optional for the client: arrays are read through their own methods
    import numpy as np

PIXEL_DTYPES = {"uint8": "uint8", "<u2": "uint16", "=u2": "uint16", "<f4": "float32", "=f4": "float32"}
"""numpy dtype strings (``arr.dtype.str``, byte order included) -> the wire name of a pixel type."""


class RetrievalError(CbmirError, grpc.RpcError):
    """A call the server answered with an error status.

    Attributes:
        status: the status name, e.g. ``INVALID_ARGUMENT`` or ``UNAVAILABLE``.
        message: the server's message (what was wrong and how to fix it).

    It is also a ``grpc.RpcError`` with ``code()`` and ``details()``, so code written against raw gRPC keeps working.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self._code, self.message = code, message
        self.status = code.name
        super().__init__(f"{self.status}: {message}")

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self.message


@contextmanager
def _raising_retrieval_errors() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        if isinstance(exc, RetrievalError):
            raise
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else None) or str(code.name)
        raise RetrievalError(code, details) from exc


class SearchOptions(TypedDict, total=False):
    """Keyword options of the ``search_*`` methods and :func:`build_request` (see retrieval.proto)."""

    k: int
    method: str
    rerank: str | None
    k_prep: int
    filters: Mapping[str, FilterValue | Sequence[FilterValue]] | None
    exclude_ids: Iterable[str]
    include_self: bool
    rerank_vector: Sequence[float] | np.ndarray | None
    predict_class: bool
    min_class_confidence: float
    class_vote: int
    group_by: str
    group_size: int
    max_distance: float | None
    offset: int
    fusion: str
    expand: int
    expand_alpha: float | None
    reciprocal_k1: int


FilterValue = str | int | float | bool
"""A metadata value to match; non-strings are compared as their text (``3`` matches ``"3"``)."""


@dataclass
class IngestItem:
    """One image to add over the API: encoded ``image`` bytes or a 2-D ``pixels`` array, and its metadata."""

    id: str
    image: bytes | None = None
    pixels: Any = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Hit:
    """One search result."""

    id: str
    uri: str
    rank: int
    distance: float
    metadata: dict[str, str] = field(default_factory=dict)
    group: str = ""

    @classmethod
    def from_proto(cls, hit: pb.SearchHit) -> Hit:
        return cls(hit.id, hit.uri, hit.rank, hit.distance, dict(hit.metadata), hit.group)


def build_request(
    *,
    image: bytes | None = None,
    pixels: np.ndarray | None = None,
    archive_id: str | None = None,
    vector: Sequence[float] | np.ndarray | None = None,
    study_images: Sequence[bytes] | None = None,
    k: int = 10,
    method: str = "",
    rerank: str | None = None,
    k_prep: int = 0,
    filters: Mapping[str, FilterValue | Sequence[FilterValue]] | None = None,
    exclude_ids: Iterable[str] = (),
    include_self: bool = False,
    rerank_vector: Sequence[float] | np.ndarray | None = None,
    predict_class: bool = False,
    min_class_confidence: float = 0.0,
    class_vote: int = 0,
    group_by: str = "",
    group_size: int = 0,
    max_distance: float | None = None,
    offset: int = 0,
    fusion: str = "",
    expand: int = 0,
    expand_alpha: float | None = None,
    reciprocal_k1: int = 0,
) -> pb.SearchRequest:
    """A ``SearchRequest`` with exactly one query kind set.

    Raises:
        InvalidInputError: ``k`` below 1 or ``k_prep`` negative (the server checks everything else).
    """
    if k < 1:
        raise InvalidInputError(f"k must be at least 1, got {k}")
    if offset < 0 or group_size < 0:
        raise InvalidInputError(f"offset and group_size must not be negative, got {offset} and {group_size}")
    if max_distance is not None and not max_distance >= 0:
        raise InvalidInputError(f"max_distance must be a number >= 0, got {max_distance}")
    if k_prep < 0:
        raise InvalidInputError(f"k_prep must be 0 (default) or at least k, got {k_prep}")
    if reciprocal_k1 < 0:
        raise InvalidInputError(f"reciprocal_k1 must be 0 (off) or the neighbour set size, got {reciprocal_k1}")
    if expand < 0:
        raise InvalidInputError(f"expand must be 0 (off) or the number of hits to expand with, got {expand}")
    if class_vote < 0:
        raise InvalidInputError(f"class_vote must be 0 (head only) or a number of neighbours, got {class_vote}")
    req = pb.SearchRequest(
        k=k,
        method=method,
        rerank=rerank or "",
        k_prep=k_prep,
        exclude_ids=list(exclude_ids),
        include_self=include_self,
        predict_class=predict_class,
        min_class_confidence=min_class_confidence,
        class_vote=class_vote,
        group_by=group_by,
        group_size=group_size,
        offset=offset,
        fusion=fusion,
        expand=expand,
        reciprocal_k1=reciprocal_k1,
    )
    if expand_alpha is not None:
        req.expand_alpha = expand_alpha
    if max_distance is not None:
        req.max_distance = max_distance
    for name, values in (filters or {}).items():
        listed = [values] if isinstance(values, str | int | float | bool) else list(values)
        req.filters.add(field=name, values=[v if isinstance(v, str) else _text(v) for v in listed])
    if image is not None:
        req.image = image
    elif pixels is not None:
        dtype = PIXEL_DTYPES.get(getattr(getattr(pixels, "dtype", None), "str", "").replace("|u1", "uint8"))
        if dtype is None or len(pixels.shape) != 2:
            raise ValueError("pixels must be a 2-D little-endian uint8, uint16 or float32 numpy array")
        height, width = pixels.shape
        data = pixels.tobytes(order="C")
        req.pixels.CopyFrom(pb.PixelArray(width=width, height=height, dtype=dtype, data=data))
    elif archive_id is not None:
        req.archive_id = archive_id
    elif vector is not None:
        req.vector.values.extend(_floats(vector))
    elif study_images is not None:
        req.study_images.extend(study_images)
    if rerank_vector is not None:
        req.rerank_vector.values.extend(_floats(rerank_vector))
    return req


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _text(value: FilterValue) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _floats(values: Sequence[float] | np.ndarray) -> list[float]:
    """A flat list of floats from a sequence or a (1, D) / (D,) array."""
    ravel = getattr(values, "ravel", None)
    return [float(v) for v in (ravel() if ravel is not None else values)]


class RetrievalClient:
    """Blocking client for the ``cbmir.v1.Retrieval`` service.

    Args:
        target: ``host:port``.
        timeout: per-call deadline in seconds.
        max_message_mb: largest message sent or received.
        token: bearer token sent with every call (servers started with a tokens file).
        tls_ca: PEM file of the CA that signed the server certificate; turns on TLS.
        tls_cert, tls_key: this client's PEM certificate and key, for servers that require mutual TLS.
    """

    def __init__(
        self,
        target: str,
        timeout: float = 30.0,
        max_message_mb: int = 64,
        channel: grpc.Channel | None = None,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        size = max_message_mb * 1024 * 1024
        options = [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]
        if channel is None and tls_ca:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(tls_ca, "TLS CA"),
                private_key=_read_pem(tls_key, "client key") if tls_key else None,
                certificate_chain=_read_pem(tls_cert, "client certificate") if tls_cert else None,
            )
            channel = grpc.secure_channel(target, creds, options=options)
        self.channel = channel or grpc.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.last_trailers: dict[str, str] = {}
        self.timeout = timeout
        self.stub = pb_grpc.RetrievalStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def search(self, request: pb.SearchRequest, *, timeout: float | None = None) -> list[Hit]:
        """Hits of one query; the call's trailing metadata (``cbmir-predicted-class``) lands in ``last_trailers``."""
        with _raising_retrieval_errors():
            stream = self.stub.Search(request, timeout=timeout or self.timeout, metadata=self.metadata)
            hits = [Hit.from_proto(h) for h in stream]
            trailers = stream.trailing_metadata() or ()
        self.last_trailers = {k: v if isinstance(v, str) else v.decode() for k, v in trailers}
        return hits

    def search_image(
        self, image: bytes, *, timeout: float | None = None, **options: Unpack[SearchOptions]
    ) -> list[Hit]:
        """Hits for an encoded PNG, JPEG or DICOM file; ``options`` as :class:`SearchOptions`."""
        return self.search(build_request(image=image, **options), timeout=timeout)

    def search_pixels(
        self, pixels: np.ndarray, *, timeout: float | None = None, **options: Unpack[SearchOptions]
    ) -> list[Hit]:
        """Hits for a 2-D uint8, uint16 or float32 pixel array."""
        return self.search(build_request(pixels=pixels, **options), timeout=timeout)

    def search_id(
        self, archive_id: str, *, timeout: float | None = None, **options: Unpack[SearchOptions]
    ) -> list[Hit]:
        """Hits for an archived image (its stored descriptors; itself excluded unless ``include_self``)."""
        return self.search(build_request(archive_id=archive_id, **options), timeout=timeout)

    def search_vector(
        self, vector: Sequence[float] | np.ndarray, *, timeout: float | None = None, **options: Unpack[SearchOptions]
    ) -> list[Hit]:
        """Hits for a descriptor of ``method`` (``rerank_vector`` too when re-ranking)."""
        return self.search(build_request(vector=vector, **options), timeout=timeout)

    def search_study(
        self, images: Sequence[bytes], *, timeout: float | None = None, **options: Unpack[SearchOptions]
    ) -> list[Hit]:
        """Hits for several images of one study at once (``fusion``: ``min``, the default, or ``rrf``)."""
        return self.search(build_request(study_images=images, **options), timeout=timeout)

    def search_batch(self, requests: Sequence[pb.SearchRequest], *, timeout: float | None = None) -> list[list[Hit]]:
        """Hits per request, in request order."""
        out: list[list[Hit]] = [[] for _ in requests]
        with _raising_retrieval_errors():
            for result in self.stub.SearchBatch(
                pb.SearchBatchRequest(queries=list(requests)), timeout=timeout or self.timeout, metadata=self.metadata
            ):
                out[result.query_index] = [Hit.from_proto(h) for h in result.hits]
        return out

    def index_info(self, *, timeout: float | None = None) -> pb.IndexInfo:
        """Count, methods, filter fields, limits and version of the served index."""
        with _raising_retrieval_errors():
            return self.stub.GetIndexInfo(
                pb.GetIndexInfoRequest(), timeout=timeout or self.timeout, metadata=self.metadata
            )

    def add_images(self, items: Iterable[IngestItem], *, timeout: float | None = None) -> pb.AddImagesResponse:
        """Stream images into the index (admin token): one durable version, one result per item, in order.

        The stream closes with an ``end_of_stream`` message, so a stream cut short by an exception in ``items``
        writes nothing.
        """

        def requests() -> Iterator[pb.AddImageRequest]:
            for item in items:
                request = pb.AddImageRequest(id=item.id, metadata=dict(item.metadata))
                if item.image is not None:
                    request.image = item.image
                elif item.pixels is not None:
                    request.pixels.CopyFrom(build_request(pixels=item.pixels).pixels)
                yield request
            yield pb.AddImageRequest(end_of_stream=True)

        with _raising_retrieval_errors():
            return self.stub.AddImages(requests(), timeout=timeout or self.timeout, metadata=self.metadata)

    def remove_images(
        self, ids: Sequence[str], *, missing_ok: bool = False, timeout: float | None = None
    ) -> pb.RemoveImagesResponse:
        """Remove archive ids from the index (admin token); a new version is served before the answer."""
        with _raising_retrieval_errors():
            return self.stub.RemoveImages(
                pb.RemoveImagesRequest(ids=list(ids), missing_ok=missing_ok),
                timeout=timeout or self.timeout,
                metadata=self.metadata,
            )

    def thumbnails(
        self, ids: Sequence[str], max_side: int = 128, *, timeout: float | None = None
    ) -> list[pb.Thumbnail]:
        """PNG previews of archived images by id, in order; an item whose image cannot be read carries ``error``."""
        with _raising_retrieval_errors():
            response = self.stub.GetThumbnails(
                pb.ThumbnailsRequest(ids=list(ids), max_side=max_side),
                timeout=timeout or self.timeout,
                metadata=self.metadata,
            )
        return list(response.thumbnails)

    @property
    def last_timings_ms(self) -> dict[str, float]:
        """Per-stage milliseconds (decode, preprocess, extract, search, rerank) of the last ``search``."""
        import json

        return dict(json.loads(self.last_trailers.get("cbmir-timings-ms", "{}")))

    @property
    def last_predicted_class(self) -> str | None:
        """The class the last ``predict_class`` search was restricted to; ``""`` when no class reached the confidence
        threshold (the whole archive was searched), None when the last search did not predict."""
        return self.last_trailers.get("cbmir-predicted-class")

    def reload(self, *, timeout: float | None = None) -> pb.ReloadResponse:
        """Ask the server to swap in the bundle's live version (admin token needed when tokens are set)."""
        with _raising_retrieval_errors():
            return self.stub.Reload(pb.ReloadRequest(), timeout=timeout or self.timeout, metadata=self.metadata)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """``SERVING``, ``NOT_SERVING`` or ``UNKNOWN``."""
        with _raising_retrieval_errors():
            resp = self.health_stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def format_hits(hits: Sequence[Hit], fields: Sequence[str] | None = None) -> str:
    """A readable table of hits: rank, distance, id and the metadata ``fields`` (default: every field a hit has)."""
    if fields is None:
        fields = list(dict.fromkeys(k for h in hits for k in h.metadata))
    shown = [f for f in fields if any(f in h.metadata for h in hits)]
    header = ["rank", "distance", "id", *shown]
    rows = [[str(h.rank), f"{h.distance:.4f}", h.id, *(h.metadata.get(f, "") for f in shown)] for h in hits]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    return "\n".join(lines) if hits else "(no hits)"
