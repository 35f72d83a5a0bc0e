"""Learned whitening from site-shift pairs: a projection under which an image and its re-exports coincide.

Radenović, Tolias and Chum (TPAMI 2018) learn a whitening from matching image pairs. Here the pairs need no
labels: each pairs an archive image with its own re-export by the site-shift family
(:mod:`cbmir.training.reexport`: other window, gamma, JPEG quality, resolution and noise). The projection reduces
the descriptors to ``2 * dim`` principal components of the archive sample, whitens the covariance of the pair
differences there (shrunk towards its mean variance by :data:`SHRINKAGE`, since a few thousand pairs estimate it
poorly), and keeps the ``dim`` directions of largest variance across images in that whitened space: directions
that vary much between images and little when the same image comes from another site.

It is a linear map like PCA (``(x - mean) @ matrix``, then L2), so search, index types and runtimes are unchanged;
fitting costs describing the sample :data:`SHIFT_COPIES` more times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cbmir.errors import InvalidInputError

SHIFT_COPIES = 2
"""Re-exports described per sample image."""

SHRINKAGE = 0.1
"""Weight of the mean variance added to the pair-difference covariance before whitening."""

MAX_SAMPLE = 2500
"""Most sample images re-exported: 5,000 pairs estimate a 256-wide covariance well, and fitting stays short."""


def fit_site_whitening(
    raw: np.ndarray, shifted: Sequence[np.ndarray], dim: int, shrinkage: float = SHRINKAGE
) -> tuple[np.ndarray, np.ndarray]:
    """The learned projection from descriptors of sample images and of their re-exports.

    Args:
        raw: (N, D) descriptors of archive images.
        shifted: (N, D) descriptors of the same images, each array one re-export of every image.
        dim: output width.
        shrinkage: see :data:`SHRINKAGE`.

    Returns:
        ``mean`` (D,) and ``matrix`` (D, dim), both float32: describe with ``(x - mean) @ matrix``.
    """
    x = np.asarray(raw, dtype=np.float64)
    n, width = x.shape
    reduced = min(2 * dim, n - 1, width)
    if dim < 1 or reduced < dim:
        raise InvalidInputError(
            f"site whitening to {dim} dims needs more sample images and descriptor width than {n} x {width}; "
            "lower --pca-dim or raise --fit-sample"
        )
    if not shifted or any(np.shape(s) != x.shape for s in shifted):
        raise InvalidInputError(f"site whitening needs re-export descriptors shaped like the sample's {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    eigvals, eigvecs = np.linalg.eigh(centred.T @ centred / n)
    pca = eigvecs[:, np.argsort(eigvals)[::-1][:reduced]]
    diffs = np.concatenate([(x - np.asarray(s, dtype=np.float64)) @ pca for s in shifted])
    within = diffs.T @ diffs / len(diffs)
    within += shrinkage * np.trace(within) / reduced * np.eye(reduced)
    w, v = np.linalg.eigh(within)
    whitening = v @ np.diag(1.0 / np.sqrt(np.maximum(w, 1e-12))) @ v.T
    whitened = centred @ pca @ whitening
    between, rotation = np.linalg.eigh(whitened.T @ whitened / n)
    matrix = pca @ whitening @ rotation[:, np.argsort(between)[::-1][:dim]]
    return mean.astype(np.float32), matrix.astype(np.float32)
