"""Training images whose label their nearest neighbours do not share.

Archive labels are noisy: a catch-all class collects whatever was not sorted, DICOM ``BodyPartExamined`` is filled
in by hand, an ankle gets filed under Wrist. Class-balanced sampling then repeats a mislabelled image of a small
class many times per epoch. Before fine-tuning, the start weights describe the training images and an image is
dropped when too few of its nearest neighbours from other groups (patients) carry its label: a patient's own images
cannot vouch for each other.
"""

from __future__ import annotations

import numpy as np

from cbmir.errors import InvalidInputError

SIMILARITY_BUDGET = 1 << 26
"""Most similarity entries (float32) computed at once: rows per chunk = this // N."""


def neighbour_label_share(descriptors: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """Share of each image's ``k`` most similar images from other groups that carry its label.

    Args:
        descriptors: (N, D) L2-normalised float32.
        labels: (N,) integer class codes.
        groups: (N,) integer group codes (every image a group of its own where there are none).
        k: neighbours per image.

    Returns:
        (N,) float in [0, 1]; 1 for an image with no image of another group to compare with.
    """
    if k < 1:
        raise InvalidInputError(f"label_filter_k must be at least 1, got {k}")
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    n = len(x)
    share = np.ones(n, dtype=np.float64)
    if n < 2:
        return share
    rows_per_chunk = max(1, SIMILARITY_BUDGET // n)
    kk = min(k, n - 1)
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(n, start + rows_per_chunk))
        sims = x[rows] @ x.T
        sims[groups[rows, None] == groups[None, :]] = -np.inf
        nearest = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        valid = np.isfinite(np.take_along_axis(sims, nearest, axis=1))
        agree = (labels[nearest] == labels[rows, None]) & valid
        counted = valid.sum(1)
        share[rows] = np.where(counted > 0, agree.sum(1) / np.maximum(counted, 1), 1.0)
    return share


def keep_consistent_labels(
    descriptors: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, k: int, min_share: float
) -> np.ndarray:
    """Which images to train on: those whose label at least ``min_share`` of their ``k`` neighbours carry.

    A class that would lose every image keeps them all, so the head still has examples of it.

    Args:
        descriptors: (N, D) L2-normalised float32.
        labels: (N,) integer class codes.
        groups: (N,) integer group codes.

    Returns:
        (N,) bool mask.
    """
    if not 0.0 <= min_share <= 1.0:
        raise InvalidInputError(f"label_filter must be in [0, 1] (a share of neighbours), got {min_share}")
    keep = neighbour_label_share(descriptors, labels, groups, k) >= min_share
    emptied = np.setdiff1d(np.unique(labels), np.unique(labels[keep]))
    return keep | np.isin(labels, emptied)
