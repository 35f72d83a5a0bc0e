"""FAISS on the GPU: copies of a bundle's flat and IVF indices on CUDA, for unfiltered searches.

Needs a FAISS build with GPU support (the optional extra ``cbmir[gpu]``, ``faiss-gpu-cu12``, instead of
``faiss-cpu``) and a visible GPU. Filtered searches stay on the CPU copy, whose ID selector keeps them exact; HNSW,
SQ8, IVF-PQ and ITQ indices and the L1 metric stay on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faiss

from cbmir.errors import InvalidInputError

log = logging.getLogger(__name__)

SEARCH_DEVICES = ("auto", "cpu", "cuda")
GPU_INDEX_TYPES = ("flat", "ivf")
GPU_METRICS = ("l2", "cosine")


def gpu_search_available() -> bool:
    """True when FAISS was built with GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_search_device(search_device: str) -> str:
    """``auto`` -> ``cuda`` when FAISS can use a GPU, else ``cpu``; ``cuda`` without one is refused.

    Raises:
        InvalidInputError: unknown name, or ``cuda`` where FAISS has no GPU support or sees no GPU.
    """
    if search_device not in SEARCH_DEVICES:
        raise InvalidInputError(f"unknown search device {search_device!r}; choose from {', '.join(SEARCH_DEVICES)}")
    if search_device == "auto":
        return "cuda" if gpu_search_available() else "cpu"
    if search_device == "cuda" and not gpu_search_available():
        why = "sees no GPU" if hasattr(faiss, "StandardGpuResources") else "has no GPU support (faiss-cpu)"
        raise InvalidInputError(
            f"--search-device cuda: FAISS {why}; install cbmir[gpu] (faiss-gpu-cu12) on a CUDA machine, "
            "or use --search-device auto or cpu"
        )
    return search_device


@dataclass
class GpuIndexes:
    """GPU copies by method name, and the FAISS resources they live in (kept alive with them)."""

    resources: Any
    indexes: dict[str, faiss.Index]


def gpu_copies(methods: Mapping[str, Any]) -> GpuIndexes:
    """GPU copies of the flat and IVF indices of ``methods`` (name -> MethodIndex); the others stay on the CPU."""
    resources = faiss.StandardGpuResources()
    indexes: dict[str, faiss.Index] = {}
    for name, info in methods.items():
        if info.index_type in GPU_INDEX_TYPES and info.metric in GPU_METRICS:
            indexes[name] = faiss.index_cpu_to_gpu(resources, 0, info.index)
        else:
            log.info("method %s (%s, %s) searches on the CPU", name, info.index_type, info.metric)
    return GpuIndexes(resources, indexes)
