"""Fine-tuning a backbone on an archive's labels: the learned descriptors behind ``cbmir train``."""

from .splits import group_kfold, group_split
from .trainer import TrainConfig, TrainResult, save_checkpoint, train_extractor

__all__ = ["TrainConfig", "TrainResult", "group_kfold", "group_split", "save_checkpoint", "train_extractor"]
