"""FAISS index types a bundle can use, how to build them, and the ``auto`` choice by archive size.

``flat`` is exact and needs no training; ``ivf`` (IVF-Flat), ``hnsw`` (HNSW-Flat), ``sq8`` (8-bit scalar
quantiser, flat scan) and ``ivfpq`` (IVF with product quantisation) trade exactness for speed or memory. ``itq`` is
the binary-code coarse-to-fine search of the hashing papers: ITQ (PCA to ``bits`` dimensions plus a learned
rotation) binarises every descriptor, a Hamming scan over the codes picks ``k_factor x k`` candidates, and those
are re-ranked exactly on the float descriptors. Filtered
searches on approximate indices fall back to an exact scan of the allowed rows (see the search engine), so
filters stay exact whatever the index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, cast

import faiss
import numpy as np

from cbmir.errors import InvalidInputError

INDEX_TYPES = ("flat", "ivf", "hnsw", "sq8", "ivfpq", "itq")
FAISS_METRICS: Mapping[str, int] = MappingProxyType(
    {"l2": faiss.METRIC_L2, "l1": faiss.METRIC_L1, "cosine": faiss.METRIC_INNER_PRODUCT}
)
AUTO_FLAT_MAX = 200_000
"""Up to this many vectors ``auto`` keeps exact flat search (about 5 ms per query on one core at 128-d)."""


def choose_index_type(n: int, metric: str) -> str:
    """The ``auto`` policy: exact flat search up to :data:`AUTO_FLAT_MAX` vectors, IVF-Flat beyond.

    Measured on 128-d MedNIST CNN descriptors (benchmarks/results/scaling.json): flat costs 2.6 ms per query at
    10^5 and 29 ms at 10^6; at 10^6 IVF-Flat (nprobe 16) answers in 0.25 ms at recall@10 0.98 with 522 bytes per
    vector and a 25 s build, HNSW (efSearch 64) in 0.12 ms at 0.98 but with 784 bytes per vector and a 70 s build.
    IVF-Flat also serves every metric (L1 included).
    """
    return "flat" if n <= AUTO_FLAT_MAX else "ivf"


def default_params(index_type: str, n: int, dim: int) -> dict[str, Any]:
    """Build and search parameters; recorded in the manifest."""
    if index_type == "ivf":
        return {"nlist": max(1, min(4 * int(math.sqrt(n)), n // 39 or 1)), "nprobe": 32}
    if index_type == "ivfpq":
        m = next(m for m in (dim // 4, dim // 8, dim // 16, 8, 4, 2, 1) if m >= 1 and dim % m == 0)
        return {"nlist": max(1, min(4 * int(math.sqrt(n)), n // 39 or 1)), "nprobe": 32, "pq_m": m}
    if index_type == "hnsw":
        return {"M": 32, "efConstruction": 80, "efSearch": 128}
    if index_type == "itq":
        return {"bits": max(8, min(128, dim // 8 * 8)), "k_factor": 10}
    return {}


def factory_string(index_type: str, params: dict[str, Any]) -> str:
    return {
        "flat": "Flat",
        "ivf": f"IVF{params.get('nlist', 1)},Flat",
        "hnsw": f"HNSW{params.get('M', 32)}",
        "sq8": "SQ8",
        "ivfpq": f"IVF{params.get('nlist', 1)},PQ{params.get('pq_m', 8)}",
        "itq": f"ITQ{params.get('bits', 64)},LSH,RFlat",
    }[index_type]


def check_index_type(index_type: str, metric: str) -> None:
    """Raise InvalidInputError unless ``index_type`` (or ``auto``) can serve ``metric``."""
    if index_type == "auto":
        return
    if index_type not in INDEX_TYPES:
        raise InvalidInputError(f"unknown index type {index_type!r}; choose from auto, {', '.join(INDEX_TYPES)}")
    if metric == "l1" and index_type in ("sq8", "ivfpq"):
        raise InvalidInputError(f"index type {index_type} does not support the L1 metric; use flat, ivf or hnsw")
    if index_type == "itq" and metric != "l2":
        raise InvalidInputError(
            f"index type itq re-ranks with FAISS's L2 refinement only; the {metric} metric needs flat, ivf or hnsw"
        )


def build_index(
    descriptors: np.ndarray, metric: str, index_type: str, params: dict[str, Any] | None = None, seed: int = 1234
) -> tuple[faiss.Index, dict[str, Any]]:
    """Train and fill an index of the given type over ``descriptors`` (N, D) float32.

    Returns:
        The index (search parameters applied) and the parameters used.
    """
    check_index_type(index_type, metric)
    n, dim = descriptors.shape
    params = {**default_params(index_type, n, dim), **(params or {})}
    if index_type == "itq" and not 1 <= int(params["bits"]) <= dim:
        raise InvalidInputError(f"itq needs 1 <= bits <= descriptor width {dim}, got {params['bits']}")
    index = faiss.index_factory(dim, factory_string(index_type, params), FAISS_METRICS[metric])
    if index_type == "hnsw":
        cast(Any, faiss.downcast_index(index)).hnsw.efConstruction = int(params["efConstruction"])
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index) if index_type in ("ivf", "ivfpq") else None
        if ivf is not None:
            ivf.cp.seed = seed
            ivf.cp.max_points_per_centroid = 64
        index.train(x)
    index.add(x)
    apply_search_params(index, index_type, params)
    return index, params


def apply_search_params(index: faiss.Index, index_type: str, params: dict[str, Any]) -> None:
    """Set nprobe / efSearch on a built or loaded index."""
    if index_type in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif index_type == "hnsw":
        cast(Any, faiss.downcast_index(index)).hnsw.efSearch = int(params["efSearch"])
    elif index_type == "itq":
        cast(Any, faiss.downcast_index(index)).k_factor = float(params["k_factor"])
