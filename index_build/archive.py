"""Archive readers: one record type from a folder tree, a zip of images, or an .npz of arrays.

An :class:`Archive` lists its entries (id, uri, metadata) up front, cheaply, and decodes one image on demand,
so a build can stream, batch and report unreadable files without stopping. Labels come from a CSV keyed by
relative path (column ``path``; ``labels.csv`` beside or inside the archive is found automatically) or,
without one, from the parent folder's name.
"""

from __future__ import annotations

import copy
import csv
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from cbmir.errors import InvalidInputError, NotFoundError
from cbmir.extractors.imaging import (
    ARCHIVE_FORMATS,
    NO_WINDOWS,
    DicomWindows,
    decode_dicom,
    decode_image,
    is_dicom,
    to_unit_gray,
)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"})


@dataclass(frozen=True)
class ArchiveEntry:
    """One archive image before decoding."""

    id: str
    uri: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageRecord:
    """One decoded archive image: ``image`` is 2-D float32 in [0, 1]."""

    id: str
    uri: str
    image: np.ndarray
    metadata: dict[str, str]


class Archive:
    """Base class: ``entries`` plus :meth:`load`, which decodes entry ``i`` or raises InvalidInputError.

    DICOM files without a VOI window of their own are decoded with :attr:`windows` (see :func:`with_windows`).
    """

    def __init__(self, entries: list[ArchiveEntry], source: str, windows: DicomWindows = NO_WINDOWS) -> None:
        self.entries = entries
        self.source = source
        self.windows = windows

    def with_windows(self, windows: DicomWindows) -> Archive:
        """The same archive, decoding DICOM files with ``windows`` (e.g. the windows of the bundle it feeds)."""
        clone = copy.copy(self)
        clone.windows = windows
        return clone

    def _decode(self, data: bytes, uri: str) -> tuple[np.ndarray, dict[str, str]]:
        return decode_archived_bytes(data, uri, self.windows)

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> ImageRecord:
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> Archive:
        """The entries at ``indices`` (in that order), decoded by this archive."""
        return _Subset(self, indices)

    def select(self, where: dict[str, str]) -> Archive:
        """Keep only entries whose metadata matches every ``field=value`` pair in ``where``."""
        if not where:
            return self
        known = {k for e in self.entries for k in e.metadata}
        unknown = sorted(set(where) - known)
        if unknown:
            raise InvalidInputError(f"cannot select on unknown metadata field(s) {unknown}; known: {sorted(known)}")
        keep = [i for i, e in enumerate(self.entries) if all(e.metadata.get(k) == v for k, v in where.items())]
        return self.subset(keep)


class _Subset(Archive):
    def __init__(self, parent: Archive, indices: Sequence[int]) -> None:
        super().__init__([parent.entries[i] for i in indices], parent.source, parent.windows)
        self._parent, self._indices = parent, list(indices)

    def with_windows(self, windows: DicomWindows) -> Archive:
        return _Subset(self._parent.with_windows(windows), self._indices)

    def load(self, index: int) -> ImageRecord:
        return self._parent.load(self._indices[index])


class MemoryArchive(Archive):
    """Images decoded in memory (ingested over the API): ids as given, uris ``ingest://<id>``."""

    def __init__(self, records: Sequence[ImageRecord], source: str = "ingest") -> None:
        super().__init__([ArchiveEntry(r.id, r.uri, dict(r.metadata)) for r in records], source)
        self._records = list(records)

    def with_windows(self, windows: DicomWindows) -> Archive:
        return self  # already decoded (the server decodes DICOM with the bundle's windows)

    def load(self, index: int) -> ImageRecord:
        return self._records[index]


def decode_archived_bytes(
    data: bytes, uri: str, windows: DicomWindows = NO_WINDOWS
) -> tuple[np.ndarray, dict[str, str]]:
    """An archived file's bytes decoded as an archive reads them: DICOM with ``windows``, or an archive format."""
    if is_dicom(data):
        return decode_dicom(data, source=uri, windows=windows)
    return decode_image(data, source=uri, formats=ARCHIVE_FORMATS), {}


def read_archived_bytes(uri: str) -> bytes:
    """The stored bytes behind a ``file://`` or ``zip://PATH!MEMBER`` uri.

    Raises:
        OSError, KeyError, zipfile.BadZipFile: the file or member is gone or unreadable.
    """
    if uri.startswith("file://"):
        return Path(url2pathname(urlparse(uri).path)).read_bytes()
    if uri.startswith("zip://"):
        path, member = uri[len("zip://") :].split("!", 1)
        with zipfile.ZipFile(path) as zf:
            return zf.read(member)
    raise KeyError(f"{uri} is not a file:// or zip:// uri")


def stores_bytes(uri: str) -> bool:
    """Whether the uri names a stored file (``file://`` or ``zip://`` member) rather than an ``.npz`` array."""
    return uri.startswith(("file://", "zip://"))


def read_stored_bytes(uri: str) -> bytes:
    """:func:`read_archived_bytes`, its failures raised as one-line errors.

    Raises:
        InvalidInputError: the file or member is gone or unreadable.
    """
    try:
        return read_archived_bytes(uri)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"{uri}: cannot read the archived image ({type(exc).__name__}: {exc})") from exc


def read_archived_image(uri: str, windows: DicomWindows = NO_WINDOWS) -> np.ndarray:
    """The image behind a record's uri (``file://``, ``zip://PATH!MEMBER``, ``npz://PATH!SPLIT/ROW``), decoded
    through the same readers that indexed it, as 2-D float32 in [0, 1].

    Raises:
        InvalidInputError: the file is gone, unreadable or not an image any more.
    """
    if stores_bytes(uri):
        return decode_archived_bytes(read_stored_bytes(uri), uri, windows)[0]
    if not uri.startswith("npz://"):
        raise InvalidInputError(f"{uri}: not an archive uri this server can read")
    try:
        path, key = uri[len("npz://") :].split("!", 1)
        split, row = key.rsplit("/", 1)
        with np.load(path) as npz:
            return to_unit_gray(npz[f"{split}_images" if f"{split}_images" in npz.files else split][int(row)])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"{uri}: cannot read the archived image ({type(exc).__name__}: {exc})") from exc


def read_labels_csv(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """Rows of a labels CSV keyed by its ``path`` column (or its first column)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise InvalidInputError(f"labels CSV {path} has no header row")
        key = "path" if "path" in reader.fieldnames else reader.fieldnames[0]
        return {row[key]: {k: v for k, v in row.items() if k != key and v is not None} for row in reader}


class FolderArchive(Archive):
    """PNG/JPEG/DICOM files under a folder; ids are paths relative to it."""

    def __init__(self, root: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).resolve()
        files = sorted(
            p for p in self.root.rglob("*") if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or not p.suffix)
        )
        rows = read_labels_csv(labels) if labels else None
        entries = []
        for path in files:
            rel = path.relative_to(self.root).as_posix()
            if rows is not None:
                if rel not in rows:
                    continue
                meta = dict(rows[rel])
            else:
                meta = {"label": path.parent.name} if path.parent != self.root else {}
            entries.append(ArchiveEntry(rel, path.as_uri(), meta))
        super().__init__(entries, str(self.root))
        self.missing = sorted(set(rows) - {e.id for e in entries}) if rows is not None else []

    def load(self, index: int) -> ImageRecord:
        entry = self.entries[index]
        try:
            data = (self.root / entry.id).read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"{entry.uri}: cannot read file ({exc})") from exc
        image, header = self._decode(data, entry.uri)
        return ImageRecord(entry.id, entry.uri, image, {**header, **entry.metadata})


class ZipArchive(Archive):
    """Images stored as members of a zip file; ids are member names."""

    def __init__(self, path: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).resolve()
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise InvalidInputError(f"cannot open zip archive {self.path}: {exc}") from exc
        members = [n for n in self._zip.namelist() if not n.endswith("/") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
        rows = read_labels_csv(labels) if labels else None
        entries = []
        for name in members:
            if rows is not None and name not in rows:
                continue
            meta = dict(rows[name]) if rows is not None else ({"label": name.split("/")[-2]} if "/" in name else {})
            entries.append(ArchiveEntry(name, f"zip://{self.path}!{name}", meta))
        super().__init__(entries, str(self.path))
        self.missing = sorted(set(rows) - set(members)) if rows is not None else []

    def load(self, index: int) -> ImageRecord:
        entry = self.entries[index]
        try:
            data = self._zip.read(entry.id)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise InvalidInputError(f"{entry.uri}: cannot read zip member ({exc})") from exc
        image, header = self._decode(data, entry.uri)
        return ImageRecord(entry.id, entry.uri, image, {**header, **entry.metadata})


class NpzArchive(Archive):
    """Arrays in an .npz: ``<split>_images`` (N, H, W) with optional ``<split>_labels``; ids ``<split>/<i>``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        try:
            data = np.load(self.path)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot open npz archive {self.path}: {exc}") from exc
        self._arrays: dict[str, np.ndarray] = {}
        entries = []
        image_keys = sorted(k for k in data.files if k.endswith("images")) or sorted(data.files)
        for key in image_keys:
            split = key[: -len("_images")] if key.endswith("_images") else key
            images = data[key]
            labels = data[f"{split}_labels"].reshape(len(images), -1) if f"{split}_labels" in data.files else None
            self._arrays[split] = images
            for i in range(len(images)):
                meta = {"split": split}
                if labels is not None:
                    meta["label"] = ",".join(str(v) for v in labels[i])
                entries.append(ArchiveEntry(f"{split}/{i:06d}", f"npz://{self.path}!{split}/{i}", meta))
        super().__init__(entries, str(self.path))
        self.missing: list[str] = []

    def load(self, index: int) -> ImageRecord:
        entry = self.entries[index]
        split, row = entry.id.rsplit("/", 1)
        return ImageRecord(entry.id, entry.uri, to_unit_gray(self._arrays[split][int(row)]), dict(entry.metadata))


def open_archive(
    path: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None, *, windows: DicomWindows = NO_WINDOWS
) -> Archive:
    """Open a folder, a .zip or an .npz; a ``labels.csv`` beside (zip) or inside (folder) is used by default.

    ``windows``: default VOI windows for DICOM files that carry none (recorded in a bundle built from it).
    """
    return _open_archive(path, labels).with_windows(windows)


def _open_archive(path: str | os.PathLike[str], labels: str | os.PathLike[str] | None) -> Archive:
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"archive {p} does not exist; pass --images with a folder, .zip or .npz")
    if labels is not None and not Path(labels).is_file():
        raise NotFoundError(f"labels CSV {labels} does not exist")
    if p.is_dir():
        default = p / "labels.csv"
        return FolderArchive(p, labels or (default if default.is_file() else None))
    if p.suffix.lower() == ".zip":
        default = p.parent / "labels.csv"
        return ZipArchive(p, labels or (default if default.is_file() else None))
    if p.suffix.lower() == ".npz":
        return NpzArchive(p)
    raise InvalidInputError(f"unsupported archive {p}: use a folder of images, a .zip or an .npz")
