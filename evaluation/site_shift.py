"""Site shift: archive images re-exported the way another hospital's scanner and PACS would, used as queries.

The gallery stays as indexed; a sample of archive images is read back from the archive, re-exported with random
but realistic changes, described by the bundle's own extractors and searched (never retrieving itself or, with
``exclude_same``, its own patient). The same sample is also searched unshifted, so each method's P@k under shift
stands beside its own unshifted figure. The changes and why their ranges are realistic:

- ``windows``: a different window/level on the 8-bit image, centre 0.35-0.65 and width 0.5-1.3 of the grey range
  (sites export CT and radiographs with their own VOI presets; widths beyond 1 flatten contrast).
- ``gamma``: gamma 0.6-1.6, log-uniform (display LUTs and vendor post-processing curves).
- ``jpeg``: re-encoding at JPEG quality 30-95 (lossy exports and teleradiology gateways; 30 is a poor gateway).
- ``resize``: down-sampling to 35-80% of the side with area averaging, then back up (lower-resolution exports and
  detector binning).
- ``noise``: Gaussian sensor noise, sigma 0.5-3% of the grey range (lower dose, other detectors).

Each query draws every listed change with its own random parameters from ``seed``, so runs are reproducible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from cbmir.errors import InvalidInputError
from cbmir.index_build.archive import read_archived_image
from cbmir.index_build.bundle import Bundle
from cbmir.server.search_engine import SearchEngine

from .protocols import K, parse_method, score_rankings

log = logging.getLogger("cbmir.eval")

SHIFTS = ("windows", "gamma", "jpeg", "resize", "noise")


def parse_shifts(spec: str) -> list[str]:
    """``windows,gamma`` -> the listed changes, in the protocol's order; ``all`` is every one."""
    names = list(SHIFTS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SHIFTS))
    if unknown or not names:
        raise InvalidInputError(f"--shift {spec!r}: choose from {', '.join(SHIFTS)} (comma-separated) or all")
    return [s for s in SHIFTS if s in names]


def shift_image(image: np.ndarray, shifts: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """One re-export of a 2-D float32 image in [0, 1]; the result is 2-D float32 in [0, 1] of the same size."""
    x = np.asarray(image, dtype=np.float32)
    h, w = x.shape
    if "windows" in shifts:
        centre, width = rng.uniform(0.35, 0.65), rng.uniform(0.5, 1.3)
        x = np.clip((x - (centre - width / 2)) / width, 0.0, 1.0)
    if "gamma" in shifts:
        x = np.power(x, np.exp(rng.uniform(np.log(0.6), np.log(1.6)))).astype(np.float32)
    if "resize" in shifts:
        scale = rng.uniform(0.35, 0.8)
        small = cv2.resize(x, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if "noise" in shifts:
        x = x + rng.normal(0.0, rng.uniform(0.005, 0.03), x.shape).astype(np.float32)
    x = np.clip(x, 0.0, 1.0)
    if "jpeg" in shifts:
        quality = int(rng.integers(30, 96))
        ok, data = cv2.imencode(".jpg", np.round(x * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        decoded = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
        if decoded is None:
            raise RuntimeError("JPEG decoding failed")
        x = decoded.astype(np.float32) / 255.0
    return np.ascontiguousarray(x, dtype=np.float32)


def evaluate_site_shift(
    bundle: Bundle,
    methods: Sequence[str],
    relevance: Sequence[str],
    shifts: Sequence[str],
    *,
    queries: int = 500,
    seed: int = 0,
    exclude_same: str | None = None,
    k_prep: int = 10,
    device: str = "auto",
    runtime: str | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """P@1, P@10 and seed mAP per method and relevance field, unshifted and shifted, on one query sample.

    Returns:
        ``{"shifts", "seed", "queries", "results": [{method, relevance, unshifted: {...}, shifted: {...}}]}``.
    """
    engine = SearchEngine(bundle, device=device, runtime=runtime, precision=precision)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(bundle), size=min(queries, len(bundle)), replace=False))
    images, kept = [], []
    for r in rows:
        try:
            images.append(read_archived_image(bundle.uris[r], bundle.dicom_windows))
            kept.append(int(r))
        except InvalidInputError as exc:
            log.warning("site shift: skipped %s (%s)", bundle.ids[r], exc)
    if not kept:
        raise InvalidInputError("site shift needs archive images it can read back; none of the sample could be read")
    rows = np.asarray(kept)
    shifted = [shift_image(img, shifts, rng) for img in images]
    excluded = [np.asarray([r]) for r in rows]
    if exclude_same:
        column = np.asarray(bundle.metadata[exclude_same])
        excluded = [np.union1d(np.flatnonzero(column == column[r]) if column[r] else [], [r]) for r in rows]
    query_meta = {f: [col[r] for r in rows] for f, col in bundle.metadata.items()}
    needed = sorted({name for spec in methods for name in parse_method(spec).names})
    t0 = time.perf_counter()
    vectors = {
        kind: {name: engine.describe(name, imgs) for name in needed}
        for kind, imgs in (("unshifted", images), ("shifted", shifted))
    }
    describe_s = time.perf_counter() - t0
    results = []
    for spec in methods:
        parsed = parse_method(spec)
        method, rerank = parsed.method, parsed.rerank
        entry: dict[str, Any] = {"method": spec}
        ranked = {}
        for kind in ("unshifted", "shifted"):
            result = engine.search(
                method,
                vectors[kind][method],
                K,
                exclude=excluded,
                rerank=rerank,
                rerank_queries=vectors[kind][rerank] if rerank else None,
                k_prep=k_prep,
                **parsed.search_options(),
            )
            ranked[kind] = result.rows
        for rel_spec in relevance:
            row = dict(entry, relevance=rel_spec)
            for kind, found in ranked.items():
                scores = score_rankings(found, bundle.metadata, query_meta, excluded, rel_spec)
                row[kind] = {
                    "P@1": scores["mP@k"][0],
                    "P@10": scores["mP@k"][K - 1],
                    "seed_mAP": scores["seed_mAP"],
                }
            row["P@1_drop"] = round(row["unshifted"]["P@1"] - row["shifted"]["P@1"], 6)
            results.append(row)
            log.info(
                "%s / %s: P@1 %.4f unshifted, %.4f under %s",
                spec,
                rel_spec,
                row["unshifted"]["P@1"],
                row["shifted"]["P@1"],
                "+".join(shifts),
            )
    return {
        "shifts": list(shifts),
        "seed": seed,
        "queries": len(rows),
        "exclude_same": exclude_same,
        "describe_s": round(describe_s, 2),
        "results": results,
    }
