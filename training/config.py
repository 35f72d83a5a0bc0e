"""The settings of a fine-tuning run (light: the command line builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cbmir.defaults import DEFAULT_MODEL, INTENSITY_MODES, OFFLINE_WEIGHTS
from cbmir.errors import InvalidInputError
from cbmir.options import option


@dataclass
class TrainConfig:
    """Everything that decides a fine-tuning run; stored in the checkpoint and the bundle manifest.

    Attributes:
        model: timm backbone.
        weights: starting weights (``imagenet`` offline package, ``timm``, ``random`` or a file).
        image_size: square training and indexing input side.
        intensity: intensity normalisation of the network's input, as ``cbmir build --intensity`` (build with the
            same one).
        epochs: most epochs; early stopping may end sooner.
        batch_size: images per optimisation step.
        lr: backbone learning rate (AdamW, cosine decay after a short warm-up); the head gets 10x.
        weight_decay: AdamW weight decay.
        freeze_blocks: keep the stem and this many first blocks/stages fixed (faster, less overfitting).
        supcon_weight: weight of the supervised contrastive loss next to cross-entropy.
        temperature: supervised contrastive temperature.
        label_smoothing: cross-entropy label smoothing.
        ema_decay: fine-tune with an exponential moving average of the weights with this decay (e.g. 0.995):
            validation and the checkpoint use the average; 0 uses the weights as trained.
        val_fraction: share of groups (patients) held out for early stopping; 0 trains for ``epochs``.
        patience: epochs without a better validation mAP before stopping.
        hflip: add horizontal flips to the augmentation.
        site_shift: augment with the site-shift family of cbmir eval --shift too (windows, gamma, JPEG,
            resize, noise; each change with probability 0.5); self-supervised training always does.
        self_supervised: train without labels: two augmented views of an image (crops, site shifts) are positives,
            every other image in the batch a negative; the checkpoint has no classification head.
        group_positives: with self_supervised and a group field, images of one group (patient) are positives too.
        projection_dim: output size of the self-supervised projection head (dropped after training).
        seed: seeds Python, NumPy and torch, the split and the sampler.
        device: ``auto``, ``cpu`` or ``cuda``; CUDA trains with mixed precision.
    """

    model: str = DEFAULT_MODEL
    weights: str = OFFLINE_WEIGHTS
    image_size: int = 160
    intensity: str = field(
        default="none",
        metadata=option(
            "intensity normalisation of the input, as cbmir build --intensity (build with the same)",
            choices=INTENSITY_MODES,
        ),
    )
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    freeze_blocks: int = 2
    supcon_weight: float = 1.0
    temperature: float = 0.1
    label_smoothing: float = 0.1
    ema_decay: float = 0.0
    val_fraction: float = 0.15
    patience: int = 3
    hflip: bool = False
    site_shift: bool = False
    self_supervised: bool = False
    group_positives: bool = True
    projection_dim: int = 128
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise InvalidInputError(
                f"--ema-decay must be in [0, 1) (0 trains without averaging, 0.995 is typical), got {self.ema_decay}"
            )
        if self.ema_decay and self.self_supervised:
            raise InvalidInputError("--ema-decay averages fine-tuning weights; drop it with --self-supervised")
