"""The settings of a fine-tuning run (light: the command line builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass

from cbmir.defaults import DEFAULT_MODEL, OFFLINE_WEIGHTS


@dataclass
class TrainConfig:
    """Everything that decides a fine-tuning run; stored in the checkpoint and the bundle manifest.

    Attributes:
        model: timm backbone.
        weights: starting weights (``imagenet`` offline package, ``timm``, ``random`` or a file).
        image_size: square training and indexing input side.
        epochs: most epochs; early stopping may end sooner.
        batch_size: images per optimisation step.
        lr: backbone learning rate (AdamW, cosine decay after a short warm-up); the head gets 10x.
        weight_decay: AdamW weight decay.
        freeze_blocks: keep the stem and this many first blocks/stages fixed (faster, less overfitting).
        supcon_weight: weight of the supervised contrastive loss next to cross-entropy.
        temperature: supervised contrastive temperature.
        label_smoothing: cross-entropy label smoothing.
        val_fraction: share of groups (patients) held out for early stopping; 0 trains for ``epochs``.
        patience: epochs without a better validation mAP before stopping.
        hflip: add horizontal flips to the augmentation.
        seed: seeds Python, NumPy and torch, the split and the sampler.
        device: ``auto``, ``cpu`` or ``cuda``; CUDA trains with mixed precision.
    """

    model: str = DEFAULT_MODEL
    weights: str = OFFLINE_WEIGHTS
    image_size: int = 160
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    freeze_blocks: int = 2
    supcon_weight: float = 1.0
    temperature: float = 0.1
    label_smoothing: float = 0.1
    val_fraction: float = 0.15
    patience: int = 3
    hflip: bool = False
    seed: int = 0
    device: str = "auto"
