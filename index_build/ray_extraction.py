"""Distributed extraction on Ray Data: the same raw descriptors as :func:`~cbmir.index_build.build.extract_archive`.

The archive listing becomes a Ray Dataset of (row, id, uri) rows. Decoding runs as Ray tasks (files read by uri,
so any worker that sees the archive's path can read it); every extractor runs in one actor pool whose actors restore
the driver's fitted extractors (configuration plus state: network weights, vocabulary, IDF, int8 model) once, so
descriptors never depend on how the work was split. Ray retries a task whose worker died and restarts a dead actor;
the driver assembles rows in archive order and the build writes the same versioned bundle as in-process.

``address``: ``None`` starts a local Ray with this machine's cores; ``auto`` joins a running cluster; a
``ray://host:10001`` or ``host:6379`` address joins that cluster (``RAY_ADDRESS`` is read when none is given).
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cbmir.checksums import sha256_pixels
from cbmir.errors import BackendUnavailableError, InvalidInputError
from cbmir.extractors import Extractor, extractor_class
from cbmir.extractors.imaging import DicomWindows

from .archive import Archive, ArchiveEntry, ImageRecord, decode_archived_bytes, read_archived_bytes, read_archived_image
from .build import Extraction

log = logging.getLogger("cbmir.build")

RAY_RETRIES = 3
"""Times a decode task or an extractor actor is retried or restarted after its worker died."""
DECODE_CPUS = 0.5
"""CPUs a decode task asks Ray for (reading and decoding is lighter than describing)."""
LOCAL_START_ATTEMPTS = 3
"""Tries to start a local Ray: its start waits a fixed 30 s for the GCS and for the raylet, which a busy machine
can overrun (``RAY_gcs_server_port_wait_time_s`` lengthens the first wait)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide extraction runs on Ray: ``address`` (None: local or ``RAY_ADDRESS``), ``actors``."""

    address: str | None = None
    actors: int | None = None


def _read_batch(uris: list[str]) -> list[bytes | Exception]:
    """Stored bytes of ``uris`` (each zip opened once per batch); an exception stands for an unreadable one."""
    out: list[bytes | Exception] = []
    zips: dict[str, zipfile.ZipFile] = {}
    try:
        for uri in uris:
            try:
                if uri.startswith("zip://"):
                    path, member = uri[len("zip://") :].split("!", 1)
                    if path not in zips:
                        zips[path] = zipfile.ZipFile(path)
                    out.append(zips[path].read(member))
                else:
                    out.append(read_archived_bytes(uri))
            except (OSError, KeyError, zipfile.BadZipFile) as exc:
                out.append(exc)
    finally:
        for zf in zips.values():
            zf.close()
    return out


def decode_rows(batch: dict[str, np.ndarray], windows: DicomWindows) -> dict[str, Any]:
    """Ray task: decode a batch of (row, uri) rows; adds image, sha256, header (JSON) and error columns."""
    uris = [str(u) for u in batch["uri"]]
    images: list[np.ndarray] = []
    digests, headers, errors = [], [], []
    npz = [u.startswith("npz://") for u in uris]
    data = _read_batch([u for u, n in zip(uris, npz) if not n])
    data_iter = iter(data)
    for uri, is_npz in zip(uris, npz):
        image, error = np.zeros((1, 1), np.float32), ""
        header: dict[str, str] = {}
        try:
            if is_npz:
                image = read_archived_image(uri, windows)
            else:
                raw = next(data_iter)
                if isinstance(raw, Exception):
                    raise InvalidInputError(f"{uri}: cannot read ({type(raw).__name__}: {raw})")
                image, header = decode_archived_bytes(raw, uri, windows)
        except InvalidInputError as exc:
            error = str(exc)
        images.append(image)
        digests.append(sha256_pixels(image) if not error else "")
        headers.append(json.dumps(header))
        errors.append(error)
    return {
        "row": batch["row"],
        "image": np.array([img.tobytes() for img in images], dtype=object),
        "shape": np.array([img.shape for img in images], dtype=np.int64),
        "sha256": np.array(digests, dtype=object),
        "header": np.array(headers, dtype=object),
        "error": np.array(errors, dtype=object),
    }


class ExtractorActor:
    """Ray actor: restores the driver's fitted extractors once, then describes batches of decoded rows."""

    def __init__(self, specs: dict[str, tuple[str, dict[str, Any], dict[str, np.ndarray]]], device: str) -> None:
        self.extractors = {
            name: extractor_class(kind).restore(config, state, device=device)
            for name, (kind, config, state) in specs.items()
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        images = [
            np.frombuffer(batch["image"][i], dtype=np.float32).reshape(tuple(int(s) for s in batch["shape"][i]))
            for i in ok
        ]
        out: dict[str, Any] = {k: batch[k] for k in ("row", "sha256", "header", "error")}
        for name, extractor in self.extractors.items():
            raw = extractor.extract(images) if images else np.zeros((0, 1), np.float32)
            full = np.zeros((len(batch["row"]), raw.shape[1]), np.float32)
            full[ok] = raw
            out[f"raw:{name}"] = full
        return out


def start_ray(address: str | None, num_cpus: int | None = None) -> Any:
    """Connect to ``address`` (``RAY_ADDRESS`` when None) or start a local Ray; returns the ``ray`` module."""
    try:
        import ray
    except ImportError as exc:
        raise InvalidInputError("--ray needs Ray Data: pip install 'ray[data]'") from exc
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address is not None:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InvalidInputError(f"cannot join the Ray cluster at {address!r}: {exc}") from exc
        return ray
    kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(**kwargs)
            return ray
        except Exception as exc:  # Ray raises RuntimeError or a bare Exception when its start times out
            if "timed out" not in str(exc).lower():
                raise
            ray.shutdown()
            log.warning("local Ray did not start (attempt %d of %d): %s", attempt, LOCAL_START_ATTEMPTS, exc)
    raise BackendUnavailableError(
        f"a local Ray did not start in {LOCAL_START_ATTEMPTS} tries (the machine may be too busy): run "
        "`ray start --head` and pass --ray auto, or build without --ray"
    )


def extract_archive_ray(
    archive: Archive,
    methods: dict[str, Extractor],
    options: RayOptions | None = None,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    on_skip: Callable[[dict[str, str]], None] | None = None,
    keep: Callable[[ImageRecord, str], bool] | None = None,
) -> Extraction:
    """Decode and extract every archive image on Ray; the result equals the in-process extraction's.

    Args:
        archive: the images (their uris must be readable by the workers: shared folders, zips or npz files).
        methods: fitted extractors by method name (their configuration and state are shipped to the actors).
        options: the Ray cluster address (see the module docstring) and the number of extractor actors (default:
            the cluster's CPUs less one, or its GPUs when the device is CUDA).
        batch_size: rows per decode task and per extractor call.
        device: where the actors' extractors run; ``cuda`` gives every actor one GPU.
        progress: log progress lines.
        on_skip: called for every unreadable image (default: log a warning).
        keep: predicate on (record, pixel sha256) deciding which decoded images are kept (the record's image is
            empty: pixels stay on the workers).
    """
    import ray

    on_skip = on_skip or (lambda s: log.warning("skipped %s", s["error"]))
    if any(e.uri.startswith("ingest://") for e in archive.entries[:1]):
        raise InvalidInputError("images ingested over the API are described in the server, not on Ray")
    options = options or RayOptions()
    ray_mod = start_ray(options.address)
    cpus = int(ray_mod.cluster_resources().get("CPU", 1))
    gpus = int(ray_mod.cluster_resources().get("GPU", 0)) if device.startswith("cuda") else 0
    pool = options.actors or (gpus if gpus else max(1, cpus - 1))
    # decode tasks need CPU too: actors never take more than the cluster's CPUs minus one decode task's share
    actor_cpus = min(1.0, max(0.1, (cpus - DECODE_CPUS) / pool))
    specs = {name: (ex.name, ex.config(), ex.state()) for name, ex in methods.items()}
    rows = [{"row": i, "uri": e.uri} for i, e in enumerate(archive.entries)]
    t0 = time.perf_counter()
    ds: Any = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 4 * pool)))
    ds = ds.map_batches(
        decode_rows,
        batch_size=batch_size,
        fn_kwargs={"windows": archive.windows},
        batch_format="numpy",
        num_cpus=DECODE_CPUS,
        max_retries=RAY_RETRIES,
    )
    ds = ds.map_batches(
        ExtractorActor,
        batch_size=batch_size,
        fn_constructor_kwargs={"specs": specs, "device": device},
        concurrency=pool,
        num_gpus=1 if gpus else 0,
        num_cpus=actor_cpus,
        batch_format="numpy",
        max_restarts=RAY_RETRIES,
        max_task_retries=RAY_RETRIES,
    )
    parts: list[dict[str, Any]] = []
    done = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(batch)
        done += len(batch["row"])
        if progress and len(parts) % 20 == 0:
            log.info("described %d/%d images on Ray (%d actors)", done, len(rows), pool)
    seconds = time.perf_counter() - t0
    return _assemble(archive.entries, methods, parts, seconds, on_skip, keep)


def _assemble(
    entries: list[ArchiveEntry],
    methods: dict[str, Extractor],
    parts: list[dict[str, Any]],
    seconds: float,
    on_skip: Callable[[dict[str, str]], None],
    keep: Callable[[ImageRecord, str], bool] | None,
) -> Extraction:
    """Rows back in archive order: records, stacked raw descriptors and skipped files, as extract_archive gives."""
    if not parts:
        return Extraction([], {name: np.zeros((0, 1), np.float32) for name in methods}, [], {}, {})
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols["row"], kind="stable")
    records, skipped, kept_rows = [], [], []
    for j in order:
        entry = entries[int(cols["row"][j])]
        if cols["error"][j]:
            s = {"id": entry.id, "uri": entry.uri, "error": str(cols["error"][j])}
            on_skip(s)
            skipped.append(s)
            continue
        digest = str(cols["sha256"][j])
        metadata = {**json.loads(str(cols["header"][j])), **entry.metadata}
        if keep is not None and not keep(
            ImageRecord(entry.id, entry.uri, np.empty((0, 0), np.float32), metadata), digest
        ):
            continue
        records.append((entry.id, entry.uri, metadata, digest))
        kept_rows.append(j)
    idx = np.asarray(kept_rows, dtype=np.int64)
    raw = {name: np.ascontiguousarray(cols[f"raw:{name}"][idx], dtype=np.float32) for name in methods}
    share = seconds / max(1, len(methods))
    return Extraction(
        records, raw, skipped, {name: share for name in methods}, {"extract_loop": seconds, "ray_total": seconds}
    )
