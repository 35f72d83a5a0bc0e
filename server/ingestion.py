"""Ingestion over the API: a stream of images becomes one new, durable bundle version, swapped in before the ack."""

from __future__ import annotations

from collections.abc import Iterable

from cbmir.errors import InvalidInputError, shown
from cbmir.extractors.imaging import pixels_from_buffer
from cbmir.index_build.archive import ImageRecord, MemoryArchive
from cbmir.index_build.update import UpdateReport, add_to_bundle
from cbmir.v1 import retrieval_pb2 as pb

from .config import ServerConfig
from .planning import MAX_NAME_CHARS, MAX_VALUE_CHARS
from .search_engine import SearchEngine


def read_items(
    engine: SearchEngine, items: Iterable[pb.AddImageRequest], config: ServerConfig
) -> tuple[list[ImageRecord], dict[str, str], list[str]]:
    """Decode every item of the stream (the whole stream is read before anything is written).

    The stream must close with ``end_of_stream`` set on its last message: gRPC may report a client that stopped
    mid-stream as a clean end (grpc/grpc#33038), so only the marker tells a finished stream from a broken one.

    Returns:
        The decodable images, per id the reason an item was refused, and the ids in request order.

    Raises:
        InvalidInputError: more items than ``max_ingest_items`` (checked as they arrive), a message after the
            end marker, or a stream that ended without it.
    """
    records: list[ImageRecord] = []
    errors: dict[str, str] = {}
    order: list[str] = []
    ended = False
    for item in items:
        if ended:
            raise InvalidInputError("AddImages message after the one with end_of_stream set; nothing was written")
        ended = item.end_of_stream
        if ended and not item.id and item.WhichOneof("content") is None and not item.metadata:
            continue
        if len(order) >= config.max_ingest_items:
            raise InvalidInputError(f"more than {config.max_ingest_items} images in one AddImages stream; split it")
        order.append(item.id[:MAX_VALUE_CHARS])
        try:
            if not item.id or len(item.id) > MAX_VALUE_CHARS:
                raise InvalidInputError(f"id must have 1 to {MAX_VALUE_CHARS} characters, got {len(item.id)}")
            for key, value in item.metadata.items():
                if not key or len(key) > MAX_NAME_CHARS or len(value) > MAX_VALUE_CHARS:
                    raise InvalidInputError(
                        f"metadata {shown(key)}: fields take 1-{MAX_NAME_CHARS} characters, "
                        f"values at most {MAX_VALUE_CHARS}"
                    )
            kind = item.WhichOneof("content")
            if kind == "image":
                image = engine.decode(item.image, source=f"image {shown(item.id)}", max_pixels=config.max_pixels)
            elif kind == "pixels":
                p = item.pixels
                if p.width * p.height > config.max_pixels:
                    raise InvalidInputError(f"pixel array {p.width}x{p.height} exceeds {config.max_pixels} pixels")
                image = pixels_from_buffer(p.width, p.height, p.dtype, p.data)
            else:
                raise InvalidInputError("no image: set image (encoded bytes) or pixels")
        except InvalidInputError as exc:
            errors[item.id[:MAX_VALUE_CHARS]] = str(exc)
            continue
        records.append(ImageRecord(item.id, f"ingest://{item.id}", image, dict(item.metadata)))
    if not ended:
        raise InvalidInputError(
            "the AddImages stream ended without end_of_stream set on its last message, as a client that stopped "
            "mid-stream does; nothing was written: set end_of_stream on the last message (RetrievalClient does)"
        )
    return records, errors, order


def ingest(
    engine: SearchEngine, items: Iterable[pb.AddImageRequest], config: ServerConfig
) -> tuple[list[pb.ItemResult], UpdateReport | None]:
    """Add the stream's decodable images to the bundle as one new version (nothing written when none is new)."""
    records, errors, order = read_items(engine, items, config)
    report = None
    if records:
        report = add_to_bundle(
            config.index, MemoryArchive(records), device=config.device, progress=False, conflicts_fail=False
        )
        for archive_id in report.conflicts:
            errors[archive_id] = f"id {shown(archive_id)} is already indexed with other pixels; remove it first"
        for skipped in report.skipped:
            errors[skipped["id"]] = skipped["error"]
    added = set(report.added) if report else set()
    results = []
    for record_id in order:
        if record_id in errors:
            results.append(pb.ItemResult(id=record_id, status="error", error=errors[record_id]))
        elif record_id in added:
            results.append(pb.ItemResult(id=record_id, status="added"))
        else:
            results.append(pb.ItemResult(id=record_id, status="duplicate"))
    return results, report
