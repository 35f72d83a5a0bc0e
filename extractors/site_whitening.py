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

AUTO_IMAGES_PER_DIM = 4
"""``site_whiten="auto"`` (the ``cbmir build`` default) learns the projection when the fit sample holds at least
this many images per output dimension and the network is at least twice as wide as the output; smaller archives
keep the network's full width, where an estimate from a few hundred images would be noise."""


def site_whitening_applies(sample_size: int, width: int, dim: int) -> bool:
    """Whether ``site_whiten="auto"`` learns a ``dim``-wide projection from ``sample_size`` descriptors of ``width``."""
    return dim >= 1 and sample_size >= AUTO_IMAGES_PER_DIM * dim and width >= 2 * dim


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
