"""Batched augmentation for radiographs, on the training device."""

from __future__ import annotations

import torch
from kornia import augmentation as K


def radiograph_augmentation(
    image_size: int,
    *,
    hflip: bool = False,
    crop_scale: tuple[float, float] = (0.75, 1.0),
    crop_p: float = 0.5,
) -> torch.nn.Module:
    """Small geometric and intensity changes that keep a radiograph plausible.

    Rotation up to 10 degrees, shifts up to 6 %, zoom 0.9-1.1, a crop of 75-100 % of the area, brightness, contrast
    and gamma jitter. No flips by default: laterality markers and asymmetric anatomy (heart, liver) make a mirrored
    radiograph a different image; ``hflip`` adds them for archives where that does not matter. Self-supervised
    views take harder crops (``crop_scale`` (0.35, 1), ``crop_p`` 0.8): a crop must still match its image.

    Input and output: (B, 1, S, S) float in [0, 1].
    """
    ops: list[K.AugmentationBase2D] = [
        K.RandomAffine(degrees=10.0, translate=(0.06, 0.06), scale=(0.9, 1.1), p=0.9),
        K.RandomResizedCrop((image_size, image_size), scale=crop_scale, ratio=(0.9, 1.1), p=crop_p),
        K.RandomBrightness(brightness=(0.85, 1.15), p=0.5),
        K.RandomContrast(contrast=(0.8, 1.25), p=0.5),
        K.RandomGamma(gamma=(0.8, 1.25), p=0.5),
    ]
    if hflip:
        ops.append(K.RandomHorizontalFlip(p=0.5))
    return K.AugmentationSequential(*ops)
