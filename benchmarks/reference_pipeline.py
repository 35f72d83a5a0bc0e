"""The reference paper's online pipeline, as a baseline measured in the same process as cbmir.

SqueezeNet 1.0 (torchvision; random weights are enough for timing) at 256x256, 5x5 average pooling of the last
feature map (512 x 3 x 3 = 4608 dimensions), one image per forward pass, then a NumPy brute-force L2 scan over the
archive and a full argsort. No batching, no index.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torchvision

from cbmir.extractors.imaging import decode_image, resize_batch

DIM = 4608


class ReferencePipeline:
    """Describe one image at a time and rank the whole archive by brute force."""

    def __init__(self, archive_size: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = torchvision.models.squeezenet1_0(weights=None).features.eval()
        rng = np.random.default_rng(seed)
        self.archive = rng.standard_normal((archive_size, DIM), dtype=np.float32)

    @torch.inference_mode()
    def describe(self, image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(resize_batch([image], 256)).unsqueeze(1).expand(-1, 3, -1, -1)
        return torch.nn.functional.avg_pool2d(self.net(x), 5).flatten().numpy()

    def search(self, descriptor: np.ndarray, k: int = 10) -> np.ndarray:
        distances = np.sqrt(((self.archive - descriptor) ** 2).sum(axis=1))
        return np.argsort(distances)[:k]

    def query(self, data: bytes, k: int = 10) -> np.ndarray:
        """Encoded image bytes -> top-k archive rows, the paper's way."""
        return self.search(self.describe(decode_image(data)), k)

    def throughput(self, images: Sequence[np.ndarray]) -> float:
        """Offline extraction, one image per forward pass: images per second."""
        t0 = time.perf_counter()
        for image in images:
            self.describe(image)
        return len(images) / (time.perf_counter() - t0)
