"""The offline phase: archive -> batched descriptors -> index bundle."""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cbmir.checksums import sha256_pixels
from cbmir.errors import InvalidInputError
from cbmir.extractors import Extractor, create_extractor, resolve_device
from cbmir.extractors.runtimes import runtime_versions
from cbmir.machine import cpu_model
from cbmir.progress import progress_step

from .archive import Archive, ImageRecord
from .bundle import BundleWriter, update_lock
from .index_types import build_index, check_index_type, choose_index_type
from .records import Records

if TYPE_CHECKING:
    from .ray_extraction import RayOptions

log = logging.getLogger("cbmir.build")


@dataclass
class BuildReport:
    """What a build did: counts, skipped files with reasons, and per-stage seconds."""

    path: Path
    count: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    images_per_s: dict[str, float] = field(default_factory=dict)


def _load_batch(archive: Archive, indices: Sequence[int]) -> tuple[list[ImageRecord], list[dict[str, str]]]:
    records, skipped = [], []
    for i in indices:
        try:
            records.append(archive.load(i))
        except InvalidInputError as exc:
            skipped.append({"id": archive.entries[i].id, "uri": archive.entries[i].uri, "error": str(exc)})
    return records, skipped


@dataclass
class Extraction:
    """Raw descriptors of the readable images of an archive, and what was skipped."""

    records: list[tuple[str, str, dict[str, str], str]]
    raw: dict[str, np.ndarray]
    skipped: list[dict[str, str]]
    extract_s: dict[str, float]
    timings: dict[str, float]


def extract_archive(
    archive: Archive,
    methods: dict[str, Extractor],
    *,
    batch_size: int = 64,
    progress: bool = True,
    on_skip: Callable[[dict[str, str]], None] | None = None,
    keep: Callable[[ImageRecord, str], bool] | None = None,
) -> Extraction:
    """Decode (prefetched on a thread) and extract every archive image in batches.

    Args:
        keep: optional predicate on (record, SHA-256 of its pixels); records it rejects (e.g. duplicates of indexed
            images) are not extracted.
    """
    on_skip = on_skip or (lambda s: log.warning("skipped %s", s["error"]))  # the error names the file
    raw: dict[str, list[np.ndarray]] = {name: [] for name in methods}
    extract_s = {name: 0.0 for name in methods}
    records: list[tuple[str, str, dict[str, str], str]] = []
    skipped: list[dict[str, str]] = []
    decode_s = 0.0
    batches = [range(i, min(i + batch_size, len(archive))) for i in range(0, len(archive), batch_size)]
    bar = tqdm(total=len(archive), desc="indexing", unit="img", disable=not progress, dynamic_ncols=True)
    t_loop = time.perf_counter()
    # log lines (skipped files) print above the progress bar instead of through it
    redirect = logging_redirect_tqdm() if progress else contextlib.nullcontext()
    with redirect, ThreadPoolExecutor(1) as prefetch:
        pending = prefetch.submit(_load_batch, archive, batches[0]) if batches else None
        for b in range(len(batches)):
            t0 = time.perf_counter()
            batch_records, batch_skipped = pending.result()  # type: ignore[union-attr]
            decode_s += time.perf_counter() - t0
            if b + 1 < len(batches):
                pending = prefetch.submit(_load_batch, archive, batches[b + 1])
            for s in batch_skipped:
                on_skip(s)
            skipped.extend(batch_skipped)
            digests = [sha256_pixels(r.image) for r in batch_records]
            if keep is not None:
                kept = [(r, d) for r, d in zip(batch_records, digests) if keep(r, d)]
                batch_records, digests = [r for r, _ in kept], [d for _, d in kept]
            if batch_records:
                images = [r.image for r in batch_records]
                for name, ex in methods.items():
                    t0 = time.perf_counter()
                    raw[name].append(ex.extract(images))
                    extract_s[name] += time.perf_counter() - t0
                records.extend((r.id, r.uri, r.metadata, d) for r, d in zip(batch_records, digests))
            bar.update(len(batches[b]))
            bar.set_postfix(skipped=len(skipped))
            if not progress and (b + 1) % max(1, len(batches) // 20) == 0:
                done = batches[b].stop
                rate = done / max(time.perf_counter() - t_loop, 1e-9)
                log.info("indexed %d/%d images (%.1f img/s, %d skipped)", done, len(archive), rate, len(skipped))
    bar.close()
    stacked = {name: np.concatenate(parts) for name, parts in raw.items() if parts}
    timings = {"extract_loop": time.perf_counter() - t_loop, "decode_wait": decode_s}
    return Extraction(records, stacked, skipped, extract_s, timings)


def build_bundle(
    archive: Archive,
    out: str | Path,
    extractors: dict[str, dict[str, Any]],
    *,
    batch_size: int = 64,
    device: str = "auto",
    fit_sample: int = 5000,
    seed: int = 0,
    index_type: str | dict[str, str] = "flat",
    index_params: dict[str, Any] | None = None,
    progress: bool = True,
    on_skip: Callable[[dict[str, str]], None] | None = None,
    ray: RayOptions | None = None,
) -> BuildReport:
    """Extract every archive image with each extractor and write a new bundle version under ``out``.

    Args:
        archive: the images to index.
        out: bundle root; a new version is published there atomically.
        extractors: method name -> extractor configuration (``{"cnn": {"image_size": 128}, "hog": {}}``).
        batch_size: images decoded and described per step.
        device: ``auto``, ``cpu`` or ``cuda`` for the torch extractors.
        fit_sample: images sampled for extractors that learn before extracting (BoVW vocabulary).
        seed: sampling seed.
        index_type: ``flat`` (exact), ``ivf``, ``hnsw``, ``sq8``, ``ivfpq``, ``itq`` or ``auto`` (by archive size)
            for every method, or a method -> type mapping (methods it leaves out get ``flat``).
        index_params: overrides of the index type's build/search parameters.
        progress: show a progress bar.
        on_skip: called for every unreadable image (default: log a warning).
        ray: extract on Ray Data (fitted state from the driver's sample); None extracts in this process.

    Raises:
        InvalidInputError: empty archive, unknown extractor, or every image unreadable.
    """
    if len(archive) == 0:
        raise InvalidInputError(f"archive {archive.source} holds no images")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    torch_device = resolve_device(device)
    timings: dict[str, float] = {}
    methods: dict[str, Extractor] = {}
    t0 = time.perf_counter()
    for name, config in extractors.items():
        methods[name] = create_extractor(config.get("extractor", name), **_without(config, "extractor"), device=device)
    timings["load_models"] = time.perf_counter() - t0
    requested = index_type if isinstance(index_type, dict) else {name: index_type for name in methods}
    unknown = sorted(set(requested) - set(methods))
    if unknown:
        raise InvalidInputError(
            f"--index-type names method(s) {unknown} that are not built; methods: {sorted(methods)}"
        )
    for name, ex in methods.items():
        check_index_type(requested.get(name, "flat"), ex.metric)

    to_fit = [name for name, ex in methods.items() if ex.needs_fit]
    if to_fit:
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        sample_idx = np.sort(rng.choice(len(archive), size=min(fit_sample, len(archive)), replace=False))
        with progress_step(f"reading {len(sample_idx)} images to fit {', '.join(to_fit)}", enabled=progress):
            sample, _ = _load_batch(archive, sample_idx.tolist())
        for name in to_fit:
            t1 = time.perf_counter()
            with progress_step(f"fitting {name} on {len(sample)} images", enabled=progress):
                methods[name].fit([r.image for r in sample])
            timings[f"fit_{name}"] = time.perf_counter() - t1
        timings["fit_total"] = time.perf_counter() - t0

    if ray is not None:
        from .ray_extraction import extract_archive_ray

        extraction = extract_archive_ray(
            archive,
            methods,
            ray,
            batch_size=batch_size,
            device=str(torch_device),
            progress=progress,
            on_skip=on_skip,
        )
    else:
        extraction = extract_archive(archive, methods, batch_size=batch_size, progress=progress, on_skip=on_skip)
    records, skipped, extract_s = extraction.records, extraction.skipped, extraction.extract_s
    timings.update(extraction.timings)
    if not records:
        raise InvalidInputError(f"none of the {len(archive)} images in {archive.source} could be read")

    t0 = time.perf_counter()
    descriptors: dict[str, np.ndarray] = {}
    for name, ex in methods.items():
        stacked = extraction.raw.pop(name)
        ex.fit_archive(stacked)
        descriptors[name] = ex.transform(stacked)
        del stacked
    timings["fit_archive"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    method_info: dict[str, Any] = {}
    with update_lock(out), BundleWriter(out) as writer:
        writer.write_records(Records.from_rows(records))
        for name, ex in methods.items():
            files = {"descriptors": f"{name}.npy"}
            writer.write_array(files["descriptors"], descriptors[name])
            state = ex.state()
            if state:
                files["state"] = f"{name}.state.npz"
                writer.write_arrays(files["state"], state)
            wanted = requested.get(name, "flat")
            chosen = choose_index_type(len(records), ex.metric) if wanted == "auto" else wanted
            params: dict[str, Any] = {}
            if chosen != "flat":
                t1 = time.perf_counter()
                with progress_step(f"training the {chosen} index of {name} ({len(records)} vectors)", enabled=progress):
                    index, params = build_index(descriptors[name], ex.metric, chosen, index_params, seed=seed)
                files["index"] = f"{name}.faiss"
                writer.write_bytes(files["index"], faiss.serialize_index(index))
                timings[f"index_{name}"] = time.perf_counter() - t1
            seconds = extract_s[name] + timings.get(f"fit_{name}", 0.0)
            method_info[name] = {
                "extractor": ex.name,
                "config": ex.config(),
                "dim": ex.dim,
                "metric": ex.metric,
                "index_type": chosen,
                "index_requested": wanted,
                "index_params": params,
                "files": files,
                "extract_s": round(extract_s[name], 3),
                "images_per_s": round(len(records) / max(extract_s[name], 1e-9), 1),
                "fit_s": round(timings.get(f"fit_{name}", 0.0), 3),
                "total_s": round(seconds, 3),
            }
        timings["write"] = time.perf_counter() - t0
        manifest = {
            "count": len(records),
            "source": {"archive": archive.source, "entries": len(archive), "skipped": len(skipped)},
            "skipped": skipped[:1000],
            "methods": method_info,
            "build": {
                "device": str(torch_device),
                "batch_size": batch_size,
                "ray": None if ray is None else {"address": ray.address, "actors": ray.actors},
                "fit_sample": fit_sample,
                "seed": seed,
                "torch_threads": torch.get_num_threads(),
                "host": platform.node(),
                "platform": platform.platform(),
                "processor": cpu_model(),
                "dicom_windows": {k: list(v) for k, v in archive.windows.items()},
                "torch": torch.__version__,
                "runtimes": runtime_versions(),
                "timings_s": {k: round(v, 3) for k, v in timings.items()},
            },
        }
        path = writer.commit(manifest)
    return BuildReport(
        path=path,
        count=len(records),
        skipped=skipped,
        timings=timings,
        images_per_s={n: method_info[n]["images_per_s"] for n in methods},
    )


def _without(config: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != key}
