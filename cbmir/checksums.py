"""File checksums shared by the bundle format and the weights provenance record."""

from __future__ import annotations

import hashlib
import os

import numpy as np


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_pixels(image: np.ndarray) -> str:
    """Hex SHA-256 of a decoded image's shape and float32 pixels: equal for the same picture in any file."""
    arr = np.ascontiguousarray(image, dtype=np.float32)
    digest = hashlib.sha256(repr(arr.shape).encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()
