"""Label-free training on an archive's own images: ``cbmir train --self-supervised``.

Each image gives two views, each re-exported with its own random site shift (windows, gamma, JPEG, resize, noise:
the family of ``cbmir eval --shift``) and then cropped, rotated and jittered; the backbone learns to find one view
from the other among every view of the batch (NT-Xent, as SimCLR, through a projection head dropped afterwards).
With a group field (patient) and ``group_positives``, images of one group are positives too: the multi-positive
form of the same loss. No label is read anywhere, so the checkpoint holds no classification head; it loads as
``cbmir build --weights CKPT`` like a fine-tuned one.

There is nothing to validate retrieval against without labels: the run keeps its last epoch and logs a label-free
diagnostic, the share of held-out images that, re-exported with all five changes, find their own original first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from cbmir.errors import InvalidInputError
from cbmir.extractors.cnn import CNNExtractor

from .augment import radiograph_augmentation
from .config import TrainConfig
from .losses import supervised_contrastive_loss
from .reexport import random_reexport
from .splits import group_codes, group_split
from .trainer import (
    TrainResult,
    adamw_warmup_cosine,
    describe_pixels,
    finish_training,
    new_extractor,
    optimiser_step,
    seed_everything,
)

log = logging.getLogger("cbmir.train")

SELF_SUPERVISED_CROP_SCALE = (0.35, 1.0)
"""Area range of the views' random crops."""


def own_view_top1(extractor: CNNExtractor, originals: torch.Tensor, reexported: torch.Tensor) -> float:
    """Share of re-exported images that retrieve their own original first.

    Args:
        extractor: the network being trained.
        originals: (N, S, S) float32 in [0, 1] held-out images.
        reexported: (N, S, S) the same images re-exported with every site change (made once, so epochs are
            compared on the same queries).
    """
    if len(originals) < 2:
        return float("nan")
    gallery = describe_pixels(extractor, originals)
    queries = describe_pixels(extractor, reexported)
    return float(np.mean(np.argmax(queries @ gallery.T, axis=1) == np.arange(len(originals))))


def train_self_supervised(
    images: Sequence[np.ndarray],
    groups: Sequence[str] | None,
    config: TrainConfig,
    *,
    progress: bool = True,
    max_steps: int | None = None,
    runtime: str = "auto",
    precision: str = "fp32",
) -> TrainResult:
    """Contrastive training without labels.

    Args:
        images: N 2-D float32 images in [0, 1].
        groups: (N,) patient (or other group) per image, or None; with ``config.group_positives`` one group's
            images are positives of each other, and the held-out diagnostic never splits a group.
        config: the run's settings (``supcon_weight``, ``label_smoothing`` and ``patience`` are not used).
        progress: show a progress bar per epoch.
        max_steps: stop after this many optimisation steps in total (tests, smoke runs).
        runtime: inference runtime of the trained extractor's ``extract``.
        precision: its precision.

    Returns:
        The last epoch's extractor, no head, ``classes`` empty; ``history`` holds loss and the diagnostic.
    """
    if len(images) < 2:
        raise InvalidInputError(f"self-supervised training needs at least 2 images, got {len(images)}")
    group_values = [""] * len(images) if groups is None else [str(g) for g in groups]
    train_idx, val_idx = group_split(group_values, config.val_fraction, seed=config.seed)
    if len(train_idx) < 2:
        raise InvalidInputError("the training split holds fewer than 2 images; lower --val-fraction")
    identity = group_codes(group_values)[0] if config.group_positives else np.arange(len(images))

    seed_everything(config.seed)
    t_start = time.perf_counter()
    extractor, frozen = new_extractor(config, runtime, precision)
    device, net = extractor.device, extractor.net
    projector = torch.nn.Sequential(
        torch.nn.Linear(extractor.raw_dim, 512),
        torch.nn.ReLU(inplace=True),
        torch.nn.Linear(512, config.projection_dim),
    ).to(device)
    augment = radiograph_augmentation(
        config.image_size, hflip=config.hflip, crop_scale=SELF_SUPERVISED_CROP_SCALE, crop_p=0.8
    ).to(device)
    pixels = extractor.preprocess(images)
    val_pixels = torch.from_numpy(pixels[val_idx])
    val_reexported = torch.from_numpy(random_reexport(pixels[val_idx], np.random.default_rng(config.seed), p=1.0))
    identity_t = torch.from_numpy(identity)
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = max(1, len(train_idx) // config.batch_size)
    optimizer, scheduler = adamw_warmup_cosine(net, projector, config, steps_per_epoch * config.epochs)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: list[dict[str, float]] = []
    if len(val_idx):
        history.append(
            {"epoch": 0, "val_own_view_top1": round(own_view_top1(extractor, val_pixels, val_reexported), 5)}
        )
    step = 0
    for epoch in range(1, config.epochs + 1):
        net.train()
        for module in frozen:
            module.eval()
        order = rng.permutation(train_idx)
        t_epoch = time.perf_counter()
        loss_sum, n_batches = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
        for b in bar:
            batch = order[b * config.batch_size : (b + 1) * config.batch_size]
            if len(batch) < 2:
                continue
            views = np.concatenate([random_reexport(pixels[batch], rng), random_reexport(pixels[batch], rng)])
            with torch.no_grad():
                x = augment(torch.from_numpy(views).to(device).unsqueeze(1)).clamp_(0.0, 1.0).squeeze(1)
            ids = identity_t[np.concatenate([batch, batch])].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                z = projector(extractor.pooled(extractor.to_network_input(x)))
                loss = supervised_contrastive_loss(
                    torch.nn.functional.normalize(z.float(), dim=1), ids, config.temperature
                )
            optimiser_step(loss, optimizer, scaler, scheduler)
            step += 1
            n_batches += 1
            loss_sum += float(loss.detach())
            bar.set_postfix(loss=f"{loss_sum / n_batches:.3f}")
            if max_steps is not None and step >= max_steps:
                break
        row: dict[str, float] = {"epoch": epoch, "loss": round(loss_sum / max(1, n_batches), 5)}
        row["train_s"] = round(time.perf_counter() - t_epoch, 1)
        if len(val_idx):
            row["val_own_view_top1"] = round(own_view_top1(extractor, val_pixels, val_reexported), 5)
        history.append(row)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch"))
        if not math.isfinite(row["loss"]):
            raise InvalidInputError(f"the loss diverged at epoch {epoch}; lower --lr (now {config.lr})")
        if max_steps is not None and step >= max_steps:
            break

    training = finish_training(
        extractor,
        images,
        train_idx,
        config,
        t_start,
        objective="self-supervised: NT-Xent over two site-shifted, cropped views"
        + (", patient positives" if config.group_positives and groups is not None else ""),
        classes=0,
        val_images=int(len(val_idx)),
        best_epoch=int(history[-1]["epoch"]) if history else 0,
        best_val_mAP=None,
        history=history,
    )
    extractor.classes = None
    extractor.training = training
    return TrainResult(
        extractor=extractor,
        classes=[],
        history=history,
        best_epoch=training["best_epoch"],
        best_val_map=None,
        seconds=training["seconds"],
        training=training,
    )
