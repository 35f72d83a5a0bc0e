"""Incremental updates: add images to a bundle or remove ids from it, each as a new version.

Existing descriptors are carried over untouched, so nothing already indexed is re-extracted; new images are
described with the bundle's own fitted extractors (network weights, PCA, vocabulary and IDF as built). Ids stay
stable, and an image whose pixels are already indexed (same content hash) is not added twice. Each update reads the
live version and publishes the next one atomically under an exclusive lock on the bundle root.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from cbmir.errors import InvalidInputError, NotFoundError

from .archive import Archive, ImageRecord
from .build import extract_archive
from .bundle import Bundle, BundleWriter, load_bundle, update_lock
from .index_types import build_index
from .records import Records

if TYPE_CHECKING:
    from .ray_extraction import RayOptions

log = logging.getLogger("cbmir.update")

_VERSION_KEYS = ("format", "format_version", "version", "created", "cbmir_version", "files")


@dataclass
class UpdateReport:
    """What an update did."""

    path: Path
    count: int
    added: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


def _publish(
    root: str | os.PathLike[str],
    bundle: Bundle,
    records: Records,
    descriptors: dict[str, np.ndarray],
    operation: dict[str, Any],
    appended: bool,
) -> Path:
    """Write the next version: new records and descriptors, unchanged extractor state, indices extended or rebuilt."""
    old_dir = bundle.path
    methods: dict[str, Any] = {}
    with BundleWriter(root) as writer:
        writer.write_records(records)
        for name, method in bundle.methods.items():
            info = dict(bundle.manifest["methods"][name])
            files = {"descriptors": f"{name}.npy"}
            writer.write_array(files["descriptors"], descriptors[name])
            if "state" in info["files"]:
                files["state"] = info["files"]["state"]
                writer.copy_file(files["state"], old_dir / info["files"]["state"])
            if method.index_type != "flat":
                if appended and method.index is not None:
                    index = faiss.deserialize_index(faiss.serialize_index(method.index))  # a copy of any type
                    index.add(np.ascontiguousarray(descriptors[name][len(bundle) :], dtype=np.float32))
                else:
                    index, _ = build_index(
                        descriptors[name], method.metric, method.index_type, info.get("index_params")
                    )
                files["index"] = f"{name}.faiss"
                writer.write_bytes(files["index"], faiss.serialize_index(index))
            info["files"] = files
            methods[name] = info
        manifest = {k: v for k, v in bundle.manifest.items() if k not in _VERSION_KEYS}
        manifest.update(
            count=len(records),
            methods=methods,
            history=[
                *bundle.manifest.get("history", []),
                {**operation, "from_version": bundle.version, "at": _dt.datetime.now(_dt.UTC).isoformat()},
            ],
        )
        return writer.commit(manifest)


def add_to_bundle(
    root: str | os.PathLike[str],
    archive: Archive,
    *,
    id_prefix: str = "",
    batch_size: int = 64,
    device: str = "auto",
    runtime: str | None = None,
    progress: bool = True,
    conflicts_fail: bool = True,
    ray: RayOptions | None = None,
) -> UpdateReport:
    """Index the archive's images into a new version of the bundle at ``root``.

    An image whose pixels are already indexed is reported as a duplicate and not added. An id that is already
    indexed with different pixels is an error (ids are stable; remove the old image first); nothing is written then.

    Args:
        id_prefix: prepended to the archive's ids (e.g. ``2026-11/``) so several sources cannot collide.
        runtime: cnn runtime; None: the one the bundle was indexed with (another one is logged as a mix).
        conflicts_fail: an id indexed with other pixels fails the whole update (the CLI); False reports it in
            ``conflicts`` and adds the rest (the ingestion RPC, one result per item).
        ray: extract on Ray Data with the bundle's fitted extractors; None extracts in this process.
    """
    if len(archive) == 0:
        raise InvalidInputError(f"archive {archive.source} holds no images")
    with update_lock(root):
        bundle = load_bundle(root)
        archive = archive.with_windows(bundle.dicom_windows)  # new rows decode like the old ones
        extractors = {name: m.restore_extractor(device, runtime) for name, m in bundle.methods.items()}
        hashes = bundle.content_hashes
        if not any(hashes):
            log.warning("bundle %s predates content hashes: duplicates are detected by id only", bundle.path)
        known = {h: i for i, h in enumerate(hashes) if h}
        seen: set[str] = set()
        duplicates: list[str] = []
        conflicts: list[str] = []

        def keep(record: ImageRecord, digest: str) -> bool:
            new_id = id_prefix + record.id
            row = bundle.row_of.get(new_id)
            if digest in known or digest in seen or (row is not None and not hashes[row]):
                duplicates.append(new_id)
                return False
            if row is not None:
                conflicts.append(new_id)
                return False
            seen.add(digest)
            return True

        if ray is not None:
            from .ray_extraction import extract_archive_ray

            extraction = extract_archive_ray(
                archive,
                extractors,
                ray,
                batch_size=batch_size,
                device=str(next(iter(extractors.values())).device),
                progress=progress,
                keep=keep,
            )
        else:
            extraction = extract_archive(archive, extractors, batch_size=batch_size, progress=progress, keep=keep)
        if conflicts and conflicts_fail:
            raise InvalidInputError(
                f"{len(conflicts)} id(s) are already indexed with different pixels (e.g. {conflicts[:3]}); remove "
                "them first or add with --id-prefix; nothing was written"
            )
        added = [(id_prefix + i, uri, meta, h) for i, uri, meta, h in extraction.records]
        if not added:
            log.info("nothing new to add (%d duplicates, %d unreadable)", len(duplicates), len(extraction.skipped))
            return UpdateReport(bundle.path, len(bundle), [], duplicates, [], extraction.skipped, conflicts)
        descriptors = {
            name: np.concatenate([bundle.methods[name].descriptors, ex.transform(extraction.raw[name])])
            for name, ex in extractors.items()
        }
        path = _publish(
            root,
            bundle,
            bundle.records.concat(Records.from_rows(added)),
            descriptors,
            {
                "op": "add",
                "source": archive.source,
                "added": len(added),
                "duplicates": len(duplicates),
                "skipped": len(extraction.skipped),
            },
            appended=True,
        )
    return UpdateReport(
        path, len(bundle) + len(added), [r[0] for r in added], duplicates, [], extraction.skipped, conflicts
    )


def remove_from_bundle(root: str | os.PathLike[str], ids: Sequence[str], *, missing_ok: bool = False) -> UpdateReport:
    """Publish a version of the bundle without ``ids``; other ids and their descriptors are unchanged.

    Raises:
        NotFoundError: an id is not indexed (unless ``missing_ok``); nothing is written then.
        InvalidInputError: the removal would leave the bundle empty.
    """
    with update_lock(root):
        bundle = load_bundle(root)
        found = bundle.row_of.rows(ids)
        unknown = [i for i, r in zip(ids, found.tolist()) if r < 0]
        if unknown and not missing_ok:
            raise NotFoundError(f"{len(unknown)} id(s) are not in the index (e.g. {unknown[:3]}); nothing was removed")
        drop = np.zeros(len(bundle), dtype=bool)
        drop[found[found >= 0]] = True
        if drop.all():
            raise InvalidInputError("removing every image would leave an empty index; build a new one instead")
        removed = bundle.ids.take(np.flatnonzero(drop))
        if not removed:
            return UpdateReport(bundle.path, len(bundle))
        keep_rows = np.flatnonzero(~drop)
        descriptors = {name: np.asarray(m.descriptors[keep_rows]) for name, m in bundle.methods.items()}
        path = _publish(
            root,
            bundle,
            bundle.records.take(keep_rows),
            descriptors,
            {"op": "remove", "removed": len(removed)},
            appended=False,
        )
    return UpdateReport(path, len(keep_rows), removed=removed)
