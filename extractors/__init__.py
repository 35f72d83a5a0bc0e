"""Batched image descriptors behind one registry: ``cnn`` (timm), ``hog`` (torch) and ``bovw`` (RootSIFT BoVW)."""

from . import bovw, cnn, hog  # noqa: F401  (registers the built-in extractors)
from .base import METRICS, Extractor, resolve_device
from .registry import create_extractor, extractor_class, list_extractors, register_extractor

__all__ = [
    "METRICS",
    "Extractor",
    "create_extractor",
    "extractor_class",
    "list_extractors",
    "register_extractor",
    "resolve_device",
]
