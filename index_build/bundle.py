"""The index bundle: a versioned directory of descriptors, records, fitted state and a checksummed manifest.

Layout::

    DIR/
      CURRENT                  name of the live version (replaced atomically)
      v20261122T101500Z-3fa1/  one immutable version
        manifest.json          format version, methods (extractor config, dim, metric, index type), counts,
                               build settings and timings, sha256 and size of every other file
        records.parquet        ids, uris, metadata columns and pixel-content hashes, row-aligned with the descriptors
                               (format 1: records.json, still read)
        <method>.npy           searchable descriptors, float32 (N, dim)
        <method>.state.npz     fitted extractor state (network weights, vocabulary, IDF, PCA)
        <method>.faiss         trained approximate index (only for index types other than flat)

A version is written into a temporary directory, fsynced, renamed into place, and only then named by
``CURRENT``, so a crash at any point leaves the previous version intact and loadable.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np

from cbmir import __version__
from cbmir.checksums import sha256_file
from cbmir.errors import BundleError, CbmirError, InvalidInputError, NotFoundError
from cbmir.extractors import Extractor, extractor_class, list_extractors
from cbmir.extractors.imaging import DicomWindows, dicom_windows

from .index_types import FAISS_METRICS, apply_search_params
from .manifest import MANIFEST, MANIFEST_CHECKSUM, manifest_digest, validate_manifest, verify_manifest_bytes
from .records import RECORDS_PARQUET, Records, RowOfId, StringColumn, read_records, records_file, write_records

log = logging.getLogger(__name__)

FORMAT = "cbmir-bundle"
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
"""Format 1 kept records in ``records.json``; format 2 in ``records.parquet``."""
CURRENT = "CURRENT"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _is_version_dir(path: Path) -> bool:
    """A folder named like a version that holds a cbmir manifest (published or orphaned by a crash)."""
    return path.is_dir() and path.name.startswith("v") and (path / MANIFEST).is_file()


def _live_version(root: Path) -> str | None:
    """The version ``CURRENT`` names, or None when there is no readable pointer."""
    try:
        return (root / CURRENT).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


class BundleWriter:
    """Collects the files of one new version and publishes it atomically with :meth:`commit`.

    Must be used under :func:`update_lock`: at start it removes what crashed writers left (temporary folders,
    half-written ``CURRENT`` pointers, version folders that were never published).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise BundleError(f"{self.root} exists and is not a directory")
        foreign = self.root.is_dir() and any(
            not p.name.startswith(".") and p.name != CURRENT and not _is_version_dir(p) for p in self.root.iterdir()
        )
        if foreign and not (self.root / CURRENT).exists():
            raise BundleError(f"{self.root} is a non-empty directory that is not an index bundle; choose another --out")
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        self.tmp = self.root / f".tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        self._files: list[str] = []

    def write_array(self, name: str, array: np.ndarray) -> None:
        with open(self.tmp / name, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        self._files.append(name)

    def write_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        with open(self.tmp / name, "wb") as fh:
            np.savez(fh, **cast(dict[str, Any], arrays))
        self._files.append(name)

    def write_bytes(self, name: str, data: bytes | np.ndarray) -> None:
        (self.tmp / name).write_bytes(bytes(data))
        self._files.append(name)

    def copy_file(self, name: str, source: Path) -> None:
        shutil.copyfile(source, self.tmp / name)
        self._files.append(name)

    def write_json(self, name: str, obj: Any) -> None:
        (self.tmp / name).write_text(json.dumps(obj, separators=(",", ":")))
        self._files.append(name)

    def write_records(self, records: Records) -> None:
        write_records(self.tmp / RECORDS_PARQUET, records)
        self._files.append(RECORDS_PARQUET)

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Checksum, fsync and publish; returns the new version directory."""
        files = {}
        for name in self._files:
            path = self.tmp / name
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        now = _dt.datetime.now(_dt.UTC)
        version = f"v{now.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:6]}"
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": version,
            "created": now.isoformat(),
            "cbmir_version": __version__,
            **manifest,
            "files": files,
        }
        manifest_bytes = json.dumps(manifest, indent=2).encode()
        _write_bytes_durably(self.tmp / MANIFEST, manifest_bytes)
        _write_bytes_durably(self.tmp / MANIFEST_CHECKSUM, (manifest_digest(manifest_bytes) + "\n").encode())
        _fsync_dir(self.tmp)
        final = self.root / version
        previous = _live_version(self.root)
        os.rename(self.tmp, final)
        pointer = self.root / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
        _write_bytes_durably(pointer, version.encode())
        os.replace(pointer, self.root / CURRENT)
        _fsync_dir(self.root)
        self._prune(keep={version, previous})
        return final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _prune(self, keep: set[str | None]) -> None:
        """Delete every version folder but the live one and the one it replaced (readers may still use it)."""
        for path in self.root.iterdir():
            if _is_version_dir(path) and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Temporary folders and pointers of crashed writers, and version folders no ``CURRENT`` ever named.

        Only what is neither live nor the newest published version before it goes: a version folder newer than
        the live one was never published (the writer died before switching ``CURRENT``).
        """
        for stale in [*self.root.glob(".tmp-*"), *self.root.glob(f".{CURRENT}.*")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        live = _live_version(self.root)
        for path in self.root.iterdir():
            if _is_version_dir(path) and (live is None or path.name > live):
                shutil.rmtree(path, ignore_errors=True)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


@contextlib.contextmanager
def update_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive advisory lock on a bundle root: updates read the live version and publish the next one under it,
    so two concurrent updates cannot both start from the same version and lose one another's changes."""
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def resolve_version_dir(path: str | os.PathLike[str]) -> Path:
    """The live version directory of a bundle root (via ``CURRENT``), or ``path`` if it is a version itself."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"index bundle {p} does not exist; build one with 'cbmir build --out {p}'")
    if (p / CURRENT).is_file():
        try:
            version = (p / CURRENT).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(
                f"{p / CURRENT}: unreadable ({type(exc).__name__}); it must name a version folder"
            ) from exc
        if not version or "/" in version or "\0" in version or not (p / version).is_dir():
            raise BundleError(f"{p / CURRENT} names version {version!r}, which is missing")
        return p / version
    if (p / MANIFEST).is_file():
        return p
    raise BundleError(f"{p} is not an index bundle: neither {CURRENT} nor {MANIFEST} found")


def read_manifest(version_dir: Path) -> dict[str, Any]:
    """The version's manifest, checked against ``manifest.sha256`` and validated field by field.

    Raises:
        BundleError: naming ``manifest.json`` and the field, or the checksum.
    """
    path = version_dir / MANIFEST
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc.strerror})") from exc
    verify_manifest_bytes(version_dir, data)
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a cbmir bundle manifest (field format)")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise BundleError(
            f"{path}: bundle format version {manifest.get('format_version')!r} is not supported "
            f"(this cbmir reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}); rebuild the bundle with "
            "`cbmir build`, or serve it with the cbmir that wrote it"
        )
    return validate_manifest(manifest, path, known_extractors=list_extractors)


def verify_files(version_dir: Path, manifest: dict[str, Any]) -> None:
    """Check that every file the manifest lists exists with its recorded size and sha256."""
    for name, info in manifest.get("files", {}).items():
        path = version_dir / name
        if not path.is_file():
            raise BundleError(f"{path}: file listed in the manifest is missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise BundleError(f"{path}: size {size} bytes differs from the manifest's {info['bytes']} (truncated?)")
        if sha256_file(path) != info["sha256"]:
            raise BundleError(f"{path}: sha256 checksum differs from the manifest (file altered or corrupt)")


@dataclass
class MethodIndex:
    """One searchable descriptor of a bundle: its FAISS index and the row-aligned descriptor matrix."""

    name: str
    extractor: str
    config: dict[str, Any]
    metric: str
    dim: int
    index_type: str
    index: faiss.Index | None
    descriptors: np.ndarray
    state: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)
    manifest_path: str = MANIFEST
    storage_owner: Any = field(default=None, repr=False)
    """What owns the memory ``descriptors`` views (the flat index); kept so replacing ``index`` never frees it."""

    def restore_extractor(
        self, device: str = "auto", runtime: str | None = None, precision: str | None = None
    ) -> Extractor:
        """The fitted extractor that produced these descriptors (weights, vocabulary, PCA from the bundle).

        ``runtime`` and ``precision`` override the recorded ones for extractors that have them (``cnn``); a
        different choice is logged, since descriptors then differ slightly from the indexed ones.

        Raises:
            BundleError: the manifest's configuration or the stored state cannot rebuild it, or it describes
                images with another width than the stored descriptors.
            InvalidInputError: the device is unavailable.
        """
        where = f"{self.manifest_path}: field methods.{self.name}"
        config = dict(self.config)
        cls = extractor_class(self.extractor)
        if cls.has_runtime:
            config = _with_runtime(self.name, config, runtime, precision)
        try:
            extractor = cls.restore(config, self.state, device=device)
        except (InvalidInputError, BundleError) as exc:
            if ("device" in str(exc) and "CUDA" in str(exc)) or runtime not in (None, "bundle") or precision:
                raise
            raise BundleError(f"{where}.config: cannot restore the {self.extractor} extractor ({exc})") from exc
        except Exception as exc:
            raise BundleError(
                f"{where}.config: cannot restore the {self.extractor} extractor ({type(exc).__name__}: {exc})"
            ) from exc
        if extractor.dim != self.dim:
            raise BundleError(f"{where}.dim: {self.dim}, but the {self.extractor} extractor describes {extractor.dim}")
        return extractor


def flat_index(descriptors: np.ndarray, metric: str) -> tuple[faiss.Index, np.ndarray]:
    """A flat FAISS index over ``descriptors`` and a zero-copy numpy view of its storage."""
    n, d = descriptors.shape
    index = faiss.IndexFlat(d, FAISS_METRICS[metric])
    index.add(np.ascontiguousarray(descriptors, dtype=np.float32))
    view = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)
    return index, view


@dataclass
class Bundle:
    """A loaded, validated index bundle."""

    path: Path
    manifest: dict[str, Any]
    records: Records
    methods: dict[str, MethodIndex]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> StringColumn:
        return self.records.ids

    @property
    def uris(self) -> StringColumn:
        return self.records.uris

    @property
    def metadata(self) -> dict[str, StringColumn]:
        return self.records.metadata

    @property
    def content_hashes(self) -> StringColumn:
        return self.records.content_sha256

    @property
    def row_of(self) -> RowOfId:
        """Row of each id (built on first use: a sorted permutation, 8 bytes per record)."""
        return self.records.row_of

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", self.path.name))

    @property
    def dicom_windows(self) -> DicomWindows:
        """The default VOI windows this bundle's DICOM files were decoded with; queries and adds use the same."""
        try:
            return dicom_windows(self.manifest.get("build", {}).get("dicom_windows"))
        except CbmirError as exc:
            raise BundleError(f"{self.path / MANIFEST}: build.dicom_windows: {exc}") from exc

    def record_metadata(self, row: int) -> dict[str, str]:
        return self.records.metadata_of(row)


def load_bundle(path: str | os.PathLike[str], *, verify: bool = True, search_indexes: bool = True) -> Bundle:
    """Load and validate a bundle; every problem raises :class:`BundleError` naming the bad file.

    ``search_indexes=False`` skips the FAISS indices and memory-maps the descriptors (a server whose search
    runs in Milvus keeps no index in memory). Records stay in Arrow memory (:mod:`.records`).
    """
    version_dir = resolve_version_dir(path)
    manifest = read_manifest(version_dir)
    if verify:
        verify_files(version_dir, manifest)
    count = manifest["count"]
    records = read_records(version_dir / records_file(manifest["format_version"]), count)
    methods = {}
    for name, info in manifest["methods"].items():
        desc_path = version_dir / info["files"]["descriptors"]
        index_type = info.get("index_type", "flat")
        try:
            in_memory = index_type == "flat" and search_indexes
            descriptors = np.load(desc_path, allow_pickle=False, mmap_mode=None if in_memory else "r")
        except (OSError, ValueError) as exc:
            raise BundleError(f"{desc_path}: unreadable descriptors ({exc})") from exc
        if descriptors.shape != (count, info["dim"]) or descriptors.dtype != np.float32:
            raise BundleError(
                f"{desc_path}: descriptors are {descriptors.dtype}{descriptors.shape}, "
                f"expected float32{(count, info['dim'])}"
            )
        state: dict[str, np.ndarray] = {}
        if "state" in info["files"]:
            state_path = version_dir / info["files"]["state"]
            try:
                with np.load(state_path, allow_pickle=False) as npz:
                    state = {k: npz[k] for k in npz.files}
            except (OSError, ValueError) as exc:
                raise BundleError(f"{state_path}: unreadable extractor state ({exc})") from exc
        index: faiss.Index | None = None
        if not search_indexes:
            pass
        elif index_type == "flat":
            index, descriptors = flat_index(descriptors, info["metric"])
        else:
            index_path = version_dir / info["files"]["index"]
            try:
                index = faiss.deserialize_index(np.fromfile(index_path, dtype=np.uint8))
            except (OSError, RuntimeError) as exc:
                raise BundleError(f"{index_path}: unreadable FAISS index ({exc})") from exc
            if index.ntotal != count or index.d != info["dim"]:
                raise BundleError(f"{index_path}: index holds {index.ntotal}x{index.d}, expected {count}x{info['dim']}")
            apply_search_params(index, index_type, info.get("index_params", {}))
        methods[name] = MethodIndex(
            name=name,
            extractor=info["extractor"],
            config=info["config"],
            metric=info["metric"],
            dim=info["dim"],
            index_type=index_type,
            index=index,
            descriptors=descriptors,
            state=state,
            info=info,
            manifest_path=str(version_dir / MANIFEST),
            storage_owner=index if index_type == "flat" else None,
        )
    return Bundle(version_dir, manifest, records, methods)


def _with_runtime(method: str, config: dict[str, Any], runtime: str | None, precision: str | None) -> dict[str, Any]:
    """``config`` with the runtime and precision overridden; logs when they differ from the indexed ones."""
    indexed = (config.get("runtime", "torch"), config.get("precision", "fp32"))
    wanted = (runtime if runtime not in (None, "bundle") else indexed[0], precision or indexed[1])
    if wanted == indexed:
        return config
    log.warning(
        "method %s was indexed with %s/%s and is described here with %s/%s: query descriptors differ slightly from "
        "the indexed ones (README, Inference runtimes, gives the measured top-10 agreement)",
        method,
        *indexed,
        *wanted,
    )
    return {**config, "runtime": wanted[0], "precision": wanted[1]}
