"""Fine-tune a timm backbone on labelled archive images: cross-entropy plus supervised contrastive loss,
class-balanced sampling, patient-grouped validation and early stopping on validation retrieval mAP.

The model being trained is a :class:`cbmir.extractors.cnn.CNNExtractor`, so training sees exactly the
preprocessing that indexing and queries use, and the checkpoint loads back as ``cnn --weights CKPT``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cbmir.errors import InvalidInputError
from cbmir.evaluation.metrics import seed_map
from cbmir.extractors.cnn import CHECKPOINT_FORMAT, CNNExtractor

from .augment import radiograph_augmentation
from .config import TrainConfig
from .ema import WeightAverage
from .losses import supervised_contrastive_loss
from .reexport import random_reexport
from .splits import group_codes, group_split

log = logging.getLogger("cbmir.train")


@dataclass
class TrainResult:
    """A trained extractor (best epoch's weights, head attached) and how the run went."""

    extractor: CNNExtractor
    classes: list[str]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_map: float | None = None
    seconds: float = 0.0
    training: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _freeze(net: torch.nn.Module, n_blocks: int) -> list[torch.nn.Module]:
    """Freeze the stem and the first ``n_blocks`` blocks (EfficientNet-style ``blocks``) or ``stages``."""
    if n_blocks <= 0:
        return []
    blocks = getattr(net, "blocks", None) or getattr(net, "stages", None)
    if blocks is None:
        raise InvalidInputError(
            f"--freeze-blocks needs a backbone with .blocks or .stages; {type(net).__name__} has neither, use 0"
        )
    stem = [m for name in ("conv_stem", "bn1", "stem") if (m := getattr(net, name, None)) is not None]
    frozen = [*stem, *list(blocks)[:n_blocks]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen


def retrieval_map(descriptors: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int = 10) -> float:
    """The paper's mAP (mean P@1..k) of every row querying the others, never retrieving its own group.

    Args:
        descriptors: (N, D) L2-normalised.
        labels: (N,) int class.
        groups: (N,) int group (patient).
    """
    sim = descriptors @ descriptors.T
    sim[groups[:, None] == groups[None, :]] = -np.inf
    k = min(k, len(descriptors) - 1)
    if k < 1:
        return float("nan")
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1), axis=1)
    valid = np.isfinite(np.take_along_axis(sim, top, axis=1))
    return seed_map((labels[top] == labels[:, None]) & valid)


def new_extractor(config: TrainConfig, runtime: str, precision: str) -> tuple[CNNExtractor, list[torch.nn.Module]]:
    """The extractor to train, with its starting weights loaded, and the modules ``freeze_blocks`` keeps fixed."""
    extractor = CNNExtractor(
        model=config.model,
        weights=config.weights,
        image_size=config.image_size,
        intensity=config.intensity,
        device=config.device,
        runtime=runtime,
        precision=precision,
    )
    extractor.load_pretrained()
    return extractor, _freeze(extractor.net, config.freeze_blocks)


def adamw_warmup_cosine(
    net: torch.nn.Module, head: torch.nn.Module, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable backbone (``lr``) and the head (10x), linear warm-up then cosine decay."""
    backbone_params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": backbone_params, "lr": config.lr}, {"params": head.parameters(), "lr": config.lr * 10}],
        weight_decay=config.weight_decay,
    )
    warmup = min(50, max(1, total_steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total_steps - warmup)))
        ),
    )
    return optimizer, scheduler


def describe_pixels(extractor: CNNExtractor, pixels: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """L2-normalised pooled features of resized pixels, network in eval mode: (N, S, S) -> (N, D_raw)."""
    extractor.net.eval()
    device = extractor.device
    use_amp = device.type == "cuda"
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        for start in range(0, len(pixels), batch_size):
            x = extractor.to_network_input(pixels[start : start + batch_size].to(device))
            out.append(torch.nn.functional.normalize(extractor.pooled(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, extractor.raw_dim), np.float32)


def optimiser_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> None:
    """One scaled backward pass, optimiser update and learning-rate step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def finish_training(
    extractor: CNNExtractor,
    images: Sequence[np.ndarray],
    train_idx: np.ndarray,
    config: TrainConfig,
    t_start: float,
    **fields: Any,
) -> dict[str, Any]:
    """Put the trained network in eval mode, refit what the extractor fits (on up to 256 training images), and
    return the run's record."""
    extractor.net.eval()
    extractor.reset_runtime()
    if extractor.needs_fit:
        extractor.fit([images[i] for i in train_idx[:256]])
    return {
        **asdict(config),
        **fields,
        "train_images": int(len(train_idx)),
        "seconds": round(time.perf_counter() - t_start, 1),
        "device": str(extractor.device),
        "torch": str(torch.__version__),
    }


def train_extractor(
    images: Sequence[np.ndarray],
    labels: Sequence[str],
    groups: Sequence[str] | None,
    config: TrainConfig,
    *,
    progress: bool = True,
    max_steps: int | None = None,
    runtime: str = "auto",
    precision: str = "fp32",
) -> TrainResult:
    """Fine-tune on decoded images.

    Args:
        images: N 2-D float32 images in [0, 1].
        labels: (N,) class name per image.
        groups: (N,) patient (or other group) per image; None or ``""`` treats images as independent.
        config: the run's settings.
        progress: show a progress bar per epoch.
        max_steps: stop after this many optimisation steps in total (tests, smoke runs).
        runtime: inference runtime of the trained extractor's ``extract`` (training itself runs on torch).
        precision: its precision; int8 is calibrated on training images at the end.
    """
    if len(images) != len(labels):
        raise InvalidInputError(f"{len(images)} images but {len(labels)} labels")
    labels_arr = np.asarray([str(v) for v in labels])
    if (labels_arr == "").any():
        raise InvalidInputError(f"{int((labels_arr == '').sum())} images have an empty label; select labelled ones")
    classes = sorted(set(labels_arr.tolist()))
    if len(classes) < 2:
        raise InvalidInputError(f"training needs at least 2 classes, found {classes}")
    y_all = np.searchsorted(classes, labels_arr)
    group_values = [""] * len(images) if groups is None else [str(g) for g in groups]
    g_all, _ = group_codes(group_values)
    train_idx, val_idx = group_split(group_values, config.val_fraction, seed=config.seed)

    seed_everything(config.seed)
    t_start = time.perf_counter()
    extractor, frozen = new_extractor(config, runtime, precision)
    device = extractor.device
    net = extractor.net
    head = torch.nn.Linear(extractor.raw_dim, len(classes)).to(device)
    dropout = torch.nn.Dropout(0.2)
    augment = radiograph_augmentation(config.image_size, hflip=config.hflip).to(device)
    reexport_rng = np.random.default_rng(config.seed + 1)

    pixels = torch.from_numpy(extractor.preprocess(images))
    y = torch.from_numpy(y_all)
    val_pixels = pixels[val_idx]

    counts = np.bincount(y_all[train_idx], minlength=len(classes)).astype(np.float64)
    sample_weight = 1.0 / counts[y_all[train_idx]]
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    optimizer, scheduler = adamw_warmup_cosine(net, head, config, total_steps)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ce = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    average = WeightAverage([net, head], config.ema_decay) if config.ema_decay else None

    history: list[dict[str, float]] = []
    best_map, best_epoch, best_state, best_head, stale, step = -1.0, 0, None, None, 0, 0
    for epoch in range(1, config.epochs + 1):
        net.train()
        for module in frozen:
            module.eval()
        order = train_idx[
            torch.multinomial(torch.from_numpy(sample_weight), len(train_idx), True, generator=generator).numpy()
        ]
        t_epoch = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "supcon": 0.0, "acc": 0.0}
        n_batches = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
        for b in bar:
            batch = order[b * config.batch_size : (b + 1) * config.batch_size]
            if len(batch) < 2:
                continue
            raw = pixels[batch]
            if config.site_shift:
                raw = torch.from_numpy(random_reexport(raw.numpy(), reexport_rng))
            xb = raw.to(device, non_blocking=True).unsqueeze(1)
            yb = y[batch].to(device)
            with torch.no_grad():
                xb = augment(xb).clamp_(0.0, 1.0).squeeze(1)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                feats = extractor.pooled(extractor.to_network_input(xb))
                logits = head(dropout(feats))
                loss_ce = ce(logits.float(), yb)
                loss_sc = supervised_contrastive_loss(
                    torch.nn.functional.normalize(feats.float(), dim=1), yb, config.temperature
                )
                loss = loss_ce + config.supcon_weight * loss_sc
            optimiser_step(loss, optimizer, scaler, scheduler)
            if average is not None:
                average.update()
            step += 1
            n_batches += 1
            sums["loss"] += float(loss.detach())
            sums["ce"] += float(loss_ce.detach())
            sums["supcon"] += float(loss_sc.detach())
            sums["acc"] += float((logits.argmax(1) == yb).float().mean())
            bar.set_postfix(loss=f"{sums['loss'] / n_batches:.3f}")
            if max_steps is not None and step >= max_steps:
                break
        row = {"epoch": epoch, **{k: round(v / max(1, n_batches), 5) for k, v in sums.items()}}
        row["train_s"] = round(time.perf_counter() - t_epoch, 1)
        with average.applied() if average is not None else contextlib.nullcontext():
            if len(val_idx):
                row["val_mAP"] = round(
                    retrieval_map(describe_pixels(extractor, val_pixels), y_all[val_idx], g_all[val_idx]), 5
                )
            score = row.get("val_mAP", float("nan"))
            if not math.isfinite(score):  # no validation split, or one too small to rank: the latest epoch wins
                score = float(epoch)
            if score > best_map:
                best_map, best_epoch = score, epoch
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
                best_head = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
        history.append(row)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch"))
        if best_epoch == epoch:
            stale = 0
        else:
            stale += 1
            if len(val_idx) and stale >= config.patience:
                log.info("early stop: no better validation mAP for %d epochs", stale)
                break
        if max_steps is not None and step >= max_steps:
            break

    if best_state is None or best_head is None:
        raise InvalidInputError("no training step ran: the training split holds fewer than 2 images")
    net.load_state_dict(best_state)
    training = finish_training(
        extractor,
        images,
        train_idx,
        config,
        t_start,
        classes=len(classes),
        val_images=int(len(val_idx)),
        best_epoch=best_epoch,
        best_val_mAP=round(best_map, 5) if len(val_idx) else None,
        history=history,
    )
    seconds = training["seconds"]
    extractor.classes = classes
    extractor.training = training
    extractor.set_head(best_head["weight"].numpy(), best_head["bias"].numpy())
    return TrainResult(
        extractor=extractor,
        classes=classes,
        history=history,
        best_epoch=best_epoch,
        best_val_map=training["best_val_mAP"],
        seconds=seconds,
        training=training,
    )


def save_checkpoint(result: TrainResult, path: str | os.PathLike[str]) -> Path:
    """Write the checkpoint atomically (temporary file, fsync, rename); it loads as ``cnn --weights PATH``.

    A self-supervised result has no classification head and no classes: the checkpoint then holds neither.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": result.extractor.model_name,
        "state_dict": {k: v.detach().cpu() for k, v in result.extractor.net.state_dict().items()},
        "classes": [str(c) for c in result.classes],
        "training": result.training,
    }
    if result.extractor.head is not None:
        weight, bias = result.extractor.head
        payload["head"] = {"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
