"""The contract every descriptor extractor fulfils."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from cbmir.errors import InvalidInputError

METRICS = ("l2", "l1", "cosine")
"""Distance of a descriptor: Euclidean, L1 (city block), or cosine distance (1 - cosine similarity)."""


DEVICES = ("auto", "cpu", "cuda")
"""Device choices of every command: ``auto`` is CUDA when present, otherwise CPU."""


def resolve_device(device: str | torch.device) -> torch.device:
    """Map ``auto`` to CUDA when present, otherwise CPU; pass ``cpu``/``cuda``/``cuda:N`` through.

    Raises:
        InvalidInputError: CUDA was asked for on a machine without it, or the name is not a device.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' requested but CUDA is not available; use --device auto or cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InvalidInputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}") from exc


class Extractor(abc.ABC):
    """Turns a batch of 2-D float32 images in [0, 1] into descriptor rows.

    The contract every extractor fulfils:

    - ``name`` (set by the registry), ``metric`` (one of :data:`METRICS`), :attr:`dim`, :attr:`device`;
    - ``__init__`` takes the JSON configuration (:meth:`config`) plus ``device`` and does no I/O: pretrained
      weights are read by :meth:`load_pretrained`, which :func:`~cbmir.extractors.create_extractor` calls;
    - lifecycle in an index build: :meth:`fit` on a sample (only when :attr:`needs_fit`), :meth:`extract` on every
      batch, then :meth:`fit_archive` once on the stacked raw descriptors. :meth:`transform` maps raw descriptors
      (archive or query) to the searchable form;
    - :meth:`state` / :meth:`load_state` persist everything fitted or loaded (:meth:`restore` rebuilds from them
      without touching the original weight files);
    - :attr:`can_classify`, :attr:`classes` and :meth:`class_probabilities` for extractors with a class head.
    """

    name: ClassVar[str] = ""
    metric: ClassVar[str] = "l2"
    needs_fit: bool = False
    has_runtime: ClassVar[bool] = False
    """True when the configuration takes ``runtime`` and ``precision`` (see :mod:`cbmir.extractors.runtimes`)."""
    """True while :meth:`fit` must run on an archive sample before :meth:`extract` (vocabulary, int8 calibration)."""
    device: torch.device
    classes: list[str] | None = None
    training: dict[str, Any] | None = None
    """How a fine-tuned extractor was trained (``label_field``, history); None for pretrained ones."""

    def __init__(self, device: str = "auto") -> None:
        self.device = resolve_device(device)

    def load_pretrained(self) -> None:
        """Read what the configuration names from outside the bundle (e.g. network weights); no-op by default."""

    @property
    def can_classify(self) -> bool:
        """True when :meth:`class_probabilities` works (a fine-tuned classification head is loaded)."""
        return False

    def class_probabilities(self, raw: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) from raw descriptors (N, D_raw); columns follow :attr:`classes`."""
        raise InvalidInputError(f"extractor {self.name!r} has no classification head; fine-tune with `cbmir train`")

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Length of a searchable descriptor (after :meth:`transform`)."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments; ``create_extractor(name, **config())`` rebuilds it."""

    @abc.abstractmethod
    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Raw descriptors, (N, D_raw) float32, for N images of any size."""

    def fit(self, images: Sequence[np.ndarray]) -> None:
        """Learn what :meth:`extract` needs from a sample of archive images (e.g. a visual vocabulary)."""

    def fit_archive(self, raw: np.ndarray) -> None:
        """Learn archive-wide statistics (IDF, PCA) from all raw archive descriptors, (N, D_raw)."""

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """Map raw descriptors (N, D_raw) to searchable ones (N, dim) float32."""
        return np.ascontiguousarray(raw, dtype=np.float32)

    def describe(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Searchable descriptors of query images: ``transform(extract(images))``."""
        return self.transform(self.extract(images))

    def state(self) -> dict[str, np.ndarray]:
        """Fitted arrays to store in the bundle."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned."""

    @classmethod
    def restore(cls, config: dict[str, Any], state: dict[str, np.ndarray], device: str = "auto") -> Extractor:
        """Rebuild a fitted extractor from a bundle's config and state (no pretrained weights are read)."""
        extractor = cls(**config, device=device)
        extractor.load_state(state)
        return extractor

    def warmup(self) -> None:
        """Run once on a dummy input so the first real request does not pay for lazy initialisation."""
        self.describe([np.zeros((64, 64), dtype=np.float32)])
