"""Fine-tuning a backbone on an archive's labels: the learned descriptors behind ``cbmir train``.

``config`` (the settings, light), ``trainer`` (the loop and checkpoints), ``splits`` (patient-grouped splits),
``dataset``, ``augment`` and ``losses``.
"""

from .config import TrainConfig

__all__ = ["TrainConfig"]
