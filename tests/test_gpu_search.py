"""FAISS on the GPU (--search-device): the same hits as the CPU where a GPU exists, the CPU where not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cbmir.index_build import load_bundle
from cbmir.search_backends.faiss_gpu import gpu_search_available
from cbmir.server.search_engine import SearchEngine

GPU = pytest.mark.skipif(not gpu_search_available(), reason="needs FAISS with GPU support and a GPU")


def test_search_device_auto_falls_back_to_the_cpu_here(small_bundle: Path) -> None:
    engine = SearchEngine(load_bundle(small_bundle), device="cpu", search_device="auto")
    assert engine.backend.search_device == ("cuda" if gpu_search_available() else "cpu")


@GPU
def test_gpu_search_returns_the_cpu_hits(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    cpu = SearchEngine(bundle, device="cpu", search_device="cpu")
    gpu = SearchEngine(bundle, device="cpu", search_device="cuda")
    for method in ("cnn", "bovw"):
        q = bundle.methods[method].descriptors[:20]
        a, b = cpu.search(method, q, 10), gpu.search(method, q, 10)
        assert (a.rows == b.rows).mean() >= 0.99
        np.testing.assert_allclose(a.distances, b.distances, rtol=1e-4, atol=1e-4)
