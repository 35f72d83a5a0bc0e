"""Small PNG previews of archived images, read by archive id through the archive readers that indexed them."""

from __future__ import annotations

import cv2
import numpy as np

from cbmir.errors import CbmirError, InvalidInputError
from cbmir.index_build.archive import read_archived_image
from cbmir.v1 import retrieval_pb2 as pb

from .search_engine import SearchEngine

DEFAULT_SIDE = 128


def thumbnail_png(image: np.ndarray, max_side: int) -> tuple[bytes, int, int]:
    """An 8-bit grayscale PNG of a 2-D [0, 1] image, shrunk (never enlarged) so its longest side is ``max_side``.

    Returns:
        (PNG bytes, width, height).
    """
    height, width = image.shape
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = cv2.resize(np.ascontiguousarray(image, np.float32), (width, height), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".png", np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if not ok:
        raise InvalidInputError("PNG encoding failed")
    return encoded.tobytes(), width, height


def thumbnails(
    engine: SearchEngine, ids: list[str], max_side: int, *, max_ids: int, max_side_limit: int
) -> list[pb.Thumbnail]:
    """One thumbnail per id, in order; an unknown id or unreadable file is reported on its item only.

    Raises:
        InvalidInputError: more ids than ``max_ids``, or ``max_side`` above ``max_side_limit``.
    """
    if not ids:
        raise InvalidInputError("GetThumbnails needs at least one id")
    if len(ids) > max_ids:
        raise InvalidInputError(f"{len(ids)} ids exceed the limit of {max_ids} per GetThumbnails call; split them")
    side = max_side or DEFAULT_SIDE
    if not 8 <= side <= max_side_limit:
        raise InvalidInputError(f"max_side must be between 8 and {max_side_limit}, got {side}")
    out = []
    for archive_id in ids:
        row = engine.bundle.row_of.get(archive_id)
        if row is None:
            out.append(pb.Thumbnail(id=archive_id[:1024], error="not in this index"))
            continue
        try:
            image = read_archived_image(engine.bundle.uris[row], engine.windows)
            png, width, height = thumbnail_png(image, side)
        except CbmirError as exc:
            out.append(pb.Thumbnail(id=archive_id, error=str(exc)[:300]))
            continue
        out.append(pb.Thumbnail(id=archive_id, png=png, width=width, height=height))
    return out
