"""Batched augmentation for radiographs, on the training device."""

from __future__ import annotations

import torch
from kornia import augmentation as K


def radiograph_augmentation(image_size: int, *, hflip: bool = False) -> torch.nn.Module:
    """Small geometric and intensity changes that keep a radiograph plausible.

    Rotation up to 10 degrees, shifts up to 6 %, zoom 0.9-1.1, a crop of 75-100 % of the area, brightness, contrast
    and gamma jitter. No flips by default: laterality markers and asymmetric anatomy (heart, liver) make a mirrored
    radiograph a different image; ``hflip`` adds them for archives where that does not matter.

    Input and output: (B, 1, S, S) float in [0, 1].
    """
    ops: list[K.AugmentationBase2D] = [
        K.RandomAffine(degrees=10.0, translate=(0.06, 0.06), scale=(0.9, 1.1), p=0.9),
        K.RandomResizedCrop((image_size, image_size), scale=(0.75, 1.0), ratio=(0.9, 1.1), p=0.5),
        K.RandomBrightness(brightness=(0.85, 1.15), p=0.5),
        K.RandomContrast(contrast=(0.8, 1.25), p=0.5),
        K.RandomGamma(gamma=(0.8, 1.25), p=0.5),
    ]
    if hflip:
        ops.append(K.RandomHorizontalFlip(p=0.5))
    return K.AugmentationSequential(*ops)
