"""Intensity normalisation and smoothing before description: the same anatomy whatever window, level, gamma,
contrast or noise a site exported it with.

- ``none``: the pixels as decoded (the default of bundles built before this option).
- ``stretch``: each image's 1st-99th percentile range mapped to [0, 1] (undoes window/level and contrast changes,
  not gamma).
- ``equalize``: histogram equalisation over 256 levels, each image's grey levels replaced by their cumulative share
  of pixels: invariant to every monotone intensity change (window/level, gamma, contrast) up to clipping.
- ``clahe``: OpenCV's contrast-limited adaptive equalisation (8x8 tiles, clip limit 2): local, keeps more
  texture than ``equalize`` but is only partly invariant.
"""

from __future__ import annotations

import cv2
import numpy as np

from cbmir.defaults import INTENSITY_MODES
from cbmir.errors import InvalidInputError

_LEVELS = 256


SMOOTH_REFERENCE_SIZE = 224


def check_smooth(sigma: float) -> float:
    """``sigma`` when it is a usable smoothing width (0: off, at most 8)."""
    if not 0.0 <= sigma <= 8.0:
        raise InvalidInputError(
            f"smooth (Gaussian sigma in pixels of a {SMOOTH_REFERENCE_SIZE}-pixel image) must be within [0, 8], "
            f"got {sigma}"
        )
    return float(sigma)


def smooth_batch(batch: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each image of (N, S, S) float32.

    ``sigma`` is in pixels of a 224-pixel image and scales with S, so the same value blurs the same share of the
    field of view at every input size. ``batch`` itself when ``sigma`` is 0.
    """
    if sigma <= 0 or not len(batch):
        return batch
    scaled = sigma * batch.shape[-1] / SMOOTH_REFERENCE_SIZE
    return np.stack([cv2.GaussianBlur(image, (0, 0), scaled) for image in batch])


def check_intensity(mode: str) -> str:
    """``mode`` when it names a normalisation; InvalidInputError naming the choices otherwise."""
    if mode not in INTENSITY_MODES:
        raise InvalidInputError(f"intensity must be one of {', '.join(INTENSITY_MODES)}, got {mode!r}")
    return mode


def normalise_intensity(batch: np.ndarray, mode: str) -> np.ndarray:
    """Normalise each image of a batch.

    Args:
        batch: (N, H, W) float32 in [0, 1].
        mode: one of :data:`INTENSITY_MODES`.

    Returns:
        (N, H, W) float32 in [0, 1] (``batch`` itself for ``none``).
    """
    check_intensity(mode)
    if mode == "none" or not len(batch):
        return batch
    n = len(batch)
    flat = batch.reshape(n, -1)
    if mode == "stretch":
        low, high = np.percentile(flat, [1.0, 99.0], axis=1)
        span = np.maximum(high - low, 1e-6)[:, None]
        return np.clip((flat - low[:, None]) / span, 0.0, 1.0).astype(np.float32).reshape(batch.shape)
    levels = np.clip(np.rint(flat * (_LEVELS - 1)), 0, _LEVELS - 1).astype(np.int64)
    if mode == "clahe":
        clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
        grey = levels.astype(np.uint8).reshape(batch.shape)
        return (np.stack([clahe.apply(image) for image in grey]).astype(np.float32) / (_LEVELS - 1)).reshape(
            batch.shape
        )
    offsets = (np.arange(n) * _LEVELS)[:, None]
    counts = np.bincount((levels + offsets).ravel(), minlength=n * _LEVELS).reshape(n, _LEVELS)
    cdf = np.cumsum(counts, axis=1).astype(np.float64)
    first = np.take_along_axis(cdf, np.argmax(counts > 0, axis=1)[:, None], axis=1)
    mapping = (cdf - first) / np.maximum(cdf[:, -1:] - first, 1.0)
    return np.take_along_axis(mapping, levels, axis=1).astype(np.float32).reshape(batch.shape)
