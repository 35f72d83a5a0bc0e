"""Site shift: archive images re-exported the way another hospital's scanner and PACS would, used as queries.

The gallery stays as indexed; a sample of archive images is read back from the archive, re-exported with random
but realistic changes, described by the bundle's own extractors and searched (never retrieving itself or, with
``exclude_same``, its own patient). The same sample is also searched unshifted, so each method's P@k under shift
stands beside its own unshifted figure. CT stored as DICOM is re-windowed from its Hounsfield units. The changes
and why their ranges are realistic: :mod:`cbmir.training.reexport` (training augments with the same family).

Each query draws every listed change with its own random parameters from ``seed``, so runs are reproducible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbmir.errors import InvalidInputError
from cbmir.extractors.imaging import NO_WINDOWS, DicomWindows, dicom_hounsfield, is_dicom
from cbmir.index_build.archive import decode_archived_bytes, read_archived_image, read_stored_bytes, stores_bytes
from cbmir.index_build.bundle import Bundle
from cbmir.server.search_engine import SearchEngine
from cbmir.training.reexport import shift_image

from .protocols import K, parse_method, score_rankings

log = logging.getLogger("cbmir.eval")


def _hounsfield(data: bytes, uri: str) -> np.ndarray | None:
    return dicom_hounsfield(data, source=uri) if is_dicom(data) else None


def read_query_image(uri: str, windows: DicomWindows = NO_WINDOWS) -> tuple[np.ndarray, np.ndarray | None]:
    """An archived image as the archive shows it, (H, W) in [0, 1], and its CT values in HU when it is a CT DICOM
    file (``None`` otherwise), so that the ``windows`` change re-windows CT from its Hounsfield units."""
    if not stores_bytes(uri):
        return read_archived_image(uri, windows), None
    data = read_stored_bytes(uri)
    return decode_archived_bytes(data, uri, windows)[0], _hounsfield(data, uri)


def archived_hounsfield(uri: str) -> np.ndarray | None:
    """The CT values in HU behind an archived grey CT DICOM file; ``None`` for any other image."""
    return _hounsfield(read_stored_bytes(uri), uri) if stores_bytes(uri) else None


def reexport_images(
    images: Sequence[np.ndarray], uris: Sequence[str], shifts: Sequence[str], seed: int
) -> list[np.ndarray]:
    """Every image re-exported once by ``shifts`` from one generator seeded with ``seed``, in order; with the
    ``windows`` change, CT DICOM files (found through ``uris``, which may be empty) are re-windowed from their HU.

    Args:
        images: (H, W) float32 images in [0, 1], as the archive shows them.
        uris: their archive URIs, or empty when unknown (8-bit window/level for every image).
    """
    rng = np.random.default_rng(seed)
    if "windows" in shifts and uris:
        hounsfield = [archived_hounsfield(uri) for uri in uris]
    else:
        hounsfield = [None] * len(images)
    return [shift_image(image, shifts, rng, hu) for image, hu in zip(images, hounsfield, strict=True)]


def shift_scores(
    spec: str,
    rel_spec: str,
    ranked: Mapping[str, np.ndarray],
    archive_meta: dict[str, list[str]],
    query_meta: dict[str, list[str]],
    excluded: Sequence[np.ndarray],
) -> dict[str, Any]:
    """P@1, P@10 and seed mAP of the ``unshifted`` and ``shifted`` (Q, K) rankings of one method, and the P@1 drop."""
    row: dict[str, Any] = {"method": spec, "relevance": rel_spec}
    for kind, found in ranked.items():
        scores = score_rankings(found, archive_meta, query_meta, excluded, rel_spec)
        row[kind] = {"P@1": scores["mP@k"][0], "P@10": scores["mP@k"][K - 1], "seed_mAP": scores["seed_mAP"]}
    row["P@1_drop"] = round(row["unshifted"]["P@1"] - row["shifted"]["P@1"], 6)
    log.info(
        "%s / %s: P@1 %.4f unshifted, %.4f shifted", spec, rel_spec, row["unshifted"]["P@1"], row["shifted"]["P@1"]
    )
    return row


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
    images, hounsfield, kept = [], [], []
    for r in rows:
        try:
            image, values = read_query_image(bundle.uris[r], bundle.dicom_windows)
        except InvalidInputError as exc:
            log.warning("site shift: skipped %s (%s)", bundle.ids[r], exc)
            continue
        images.append(image)
        hounsfield.append(values)
        kept.append(int(r))
    if not kept:
        raise InvalidInputError("site shift needs archive images it can read back; none of the sample could be read")
    rows = np.asarray(kept)
    shifted = [shift_image(img, shifts, rng, hu) for img, hu in zip(images, hounsfield, strict=True)]
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
            results.append(shift_scores(spec, rel_spec, ranked, bundle.metadata, query_meta, excluded))
    return {
        "shifts": list(shifts),
        "seed": seed,
        "queries": len(rows),
        "exclude_same": exclude_same,
        "describe_s": round(describe_s, 2),
        "results": results,
    }
