"""Histogram of oriented gradients as one global descriptor, vectorised in torch (CPU or GPU).

Semantics follow ``skimage.feature.hog`` (central-difference gradients, unsigned orientations in [0, 180),
hard binning, cell means, overlapping blocks with a stride of one cell, L2-Hys block normalisation), so the
two agree to float precision. Defaults are the reference paper's: 256x256 image, 64-pixel cells, 2x2-cell
blocks, 15 bins, 540 dimensions, L1 distance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cbmir.errors import InvalidInputError
from cbmir.timing import stage

from .base import Extractor
from .imaging import resize_batch
from .intensity import check_intensity, check_smooth, normalise_intensity, smooth_batch
from .registry import register_extractor


def hog_descriptors(
    images: torch.Tensor, cell: int = 64, block: int = 2, bins: int = 15, clip: float = 0.2, eps: float = 1e-5
) -> torch.Tensor:
    """HOG descriptors of a batch of grayscale images.

    Args:
        images: (N, H, W) float tensor.
        cell: cell side in pixels; pixels past the last whole cell are ignored.
        block: block side in cells; blocks overlap with a stride of one cell.
        bins: orientation bins over [0, 180) degrees.
        clip: L2-Hys clipping threshold.
        eps: normalisation epsilon.

    Returns:
        (N, blocks_y * blocks_x * block * block * bins) tensor, ordered (block_y, block_x, cell_y, cell_x, bin).
    """
    n, h, w = images.shape
    cells_y, cells_x = h // cell, w // cell
    if cells_y < block or cells_x < block:
        raise InvalidInputError(f"image {h}x{w} is too small for {block}x{block} blocks of {cell}-pixel cells")
    g_row = torch.zeros_like(images)
    g_col = torch.zeros_like(images)
    g_row[:, 1:-1, :] = images[:, 2:, :] - images[:, :-2, :]
    g_col[:, :, 1:-1] = images[:, :, 2:] - images[:, :, :-2]
    magnitude = torch.hypot(g_row, g_col)
    orientation = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0
    bin_index = torch.clamp((orientation / (180.0 / bins)).floor().long(), max=bins - 1)

    magnitude = magnitude[:, : cells_y * cell, : cells_x * cell]
    bin_index = bin_index[:, : cells_y * cell, : cells_x * cell]
    rows = torch.arange(cells_y * cell, device=images.device) // cell
    cols = torch.arange(cells_x * cell, device=images.device) // cell
    cell_index = (rows[:, None] * cells_x + cols[None, :]).expand(n, -1, -1)
    flat = (torch.arange(n, device=images.device)[:, None, None] * (cells_y * cells_x) + cell_index) * bins + bin_index
    hist = torch.zeros(n * cells_y * cells_x * bins, dtype=images.dtype, device=images.device)
    hist.scatter_add_(0, flat.reshape(-1), magnitude.reshape(-1))
    hist = hist.view(n, cells_y, cells_x, bins) / float(cell * cell)

    blocks = hist.unfold(1, block, 1).unfold(2, block, 1)  # (N, by, bx, bins, block, block)
    blocks = blocks.permute(0, 1, 2, 4, 5, 3).reshape(n, cells_y - block + 1, cells_x - block + 1, -1)
    blocks = blocks / torch.sqrt((blocks**2).sum(-1, keepdim=True) + eps**2)
    blocks = torch.clamp(blocks, max=clip)
    blocks = blocks / torch.sqrt((blocks**2).sum(-1, keepdim=True) + eps**2)
    return blocks.reshape(n, -1)


@register_extractor("hog")
class HOGExtractor(Extractor):
    """Global HOG descriptor; L1 distance.

    Args:
        image_size: images are resized to this square side first.
        cell: cell side in pixels.
        block: block side in cells.
        bins: orientation bins.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch: images per vectorised pass.
        intensity: normalisation after resizing (:mod:`cbmir.extractors.intensity`).
        smooth: Gaussian sigma after normalisation, in pixels of a 224-pixel image (scaled to ``image_size``);
            0: off.
    """

    metric = "l1"

    def __init__(
        self,
        image_size: int = 256,
        cell: int = 64,
        block: int = 2,
        bins: int = 15,
        device: str = "auto",
        batch: int = 64,
        intensity: str = "none",
        smooth: float = 0.0,
    ) -> None:
        for name, value, low in (
            ("image_size", image_size, 8),
            ("cell", cell, 2),
            ("block", block, 1),
            ("bins", bins, 1),
            ("batch", batch, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"hog {name} must be a whole number of at least {low}, got {value!r}")
        if image_size // cell < block:
            raise InvalidInputError(f"image_size {image_size} holds fewer than {block} cells of {cell} pixels")
        self.image_size, self.cell, self.block, self.bins = int(image_size), int(cell), int(block), int(bins)
        super().__init__(device)
        self.batch = batch
        self.intensity = check_intensity(intensity)
        self.smooth = check_smooth(smooth)
        blocks = image_size // cell - block + 1
        self._dim = blocks * blocks * block * block * bins

    @property
    def dim(self) -> int:
        return self._dim

    def config(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "cell": self.cell,
            "block": self.block,
            "bins": self.bins,
            "intensity": self.intensity,
            "smooth": self.smooth,
        }

    @torch.inference_mode()
    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty((len(images), self._dim), dtype=np.float32)
        for start in range(0, len(images), self.batch):
            with stage("preprocess"):
                resized = resize_batch(images[start : start + self.batch], self.image_size)
                chunk = torch.from_numpy(smooth_batch(normalise_intensity(resized, self.intensity), self.smooth))
            with stage("extract"):
                desc = hog_descriptors(chunk.to(self.device), self.cell, self.block, self.bins)
                out[start : start + len(chunk)] = desc.cpu().numpy()
        return out
