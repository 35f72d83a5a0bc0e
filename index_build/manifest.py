"""The manifest's own protection and its schema: a bundle's manifest is checked before anything trusts it.

``manifest.sha256`` beside ``manifest.json`` holds the SHA-256 of the manifest's bytes (written before the version
is published), so a bit flip or a truncated manifest is refused; :func:`validate_manifest` then checks every field
the loader relies on: types, ranges, known metrics, index types and extractors, file entries, and that the files
a method names are listed with checksums. Every failure is a :class:`~cbmir.errors.BundleError` naming
``manifest.json`` and the field.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cbmir.errors import BundleError, CbmirError
from cbmir.extractors.base import METRICS
from cbmir.extractors.imaging import dicom_windows

from .index_types import INDEX_TYPES
from .records import records_file

MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest.sha256"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,200}$")


def manifest_digest(data: bytes) -> str:
    """The checksum recorded in ``manifest.sha256``."""
    return hashlib.sha256(data).hexdigest()


def verify_manifest_bytes(version_dir: Path, data: bytes) -> None:
    """Compare the manifest's bytes with ``manifest.sha256``; bundles written before it existed pass unchecked."""
    sidecar = version_dir / MANIFEST_CHECKSUM
    if not sidecar.exists():
        return
    try:
        recorded = sidecar.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{sidecar}: unreadable ({type(exc).__name__})") from exc
    if recorded != manifest_digest(data):
        raise BundleError(
            f"{version_dir / MANIFEST}: sha256 differs from {MANIFEST_CHECKSUM} (manifest altered or corrupt); "
            "restore the bundle or rebuild it"
        )


class _Checker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, problem: str) -> BundleError:
        return BundleError(f"{self.path}: field {field}: {problem}")

    def get(self, obj: Mapping[str, Any], key: str, field: str, kind: type | tuple[type, ...]) -> Any:
        if key not in obj:
            raise self.fail(field, "missing")
        value = obj[key]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.fail(field, f"expected a number, got {value!r}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(field, f"expected {names}, got {type(value).__name__}")
        return value

    def integer(self, obj: Mapping[str, Any], key: str, field: str, low: int) -> int:
        value = self.get(obj, key, field, int)
        if value < low:
            raise self.fail(field, f"must be at least {low}, got {value}")
        return int(value)

    def choice(self, obj: Mapping[str, Any], key: str, field: str, allowed: tuple[str, ...] | list[str]) -> str:
        value = self.get(obj, key, field, str)
        if value not in allowed:
            raise self.fail(field, f"{value!r} is not one of {', '.join(allowed)}")
        return str(value)


def validate_manifest(
    manifest: Any, path: Path, *, known_extractors: Callable[[], list[str]] | None = None
) -> dict[str, Any]:
    """Check the fields the loader relies on; returns the manifest.

    Args:
        manifest: the parsed JSON.
        path: the manifest's path, named in every message.
        known_extractors: the registered extractor names (checked when given).

    Raises:
        BundleError: ``<path>: field <name>: <problem>``.
    """
    check = _Checker(path)
    if not isinstance(manifest, dict):
        raise check.fail("(top level)", f"expected an object, got {type(manifest).__name__}")
    check.get(manifest, "version", "version", str)
    count = check.integer(manifest, "count", "count", 0)
    files = check.get(manifest, "files", "files", dict)
    if not files:
        raise check.fail("files", "lists no files; every bundle file needs a checksum")
    for name, info in files.items():
        field = f"files.{name}"
        if not _SAFE_NAME.match(name) or name in (".", ".."):
            raise check.fail(field, "not a plain file name")
        if not isinstance(info, dict):
            raise check.fail(field, f"expected an object, got {type(info).__name__}")
        if not _SHA256.match(str(check.get(info, "sha256", f"{field}.sha256", str))):
            raise check.fail(f"{field}.sha256", "not a SHA-256 hex digest")
        check.integer(info, "bytes", f"{field}.bytes", 0)
    records = records_file(manifest.get("format_version"))
    if records not in files:
        raise check.fail("files", f"{records} is not listed")
    methods = check.get(manifest, "methods", "methods", dict)
    if not methods:
        raise check.fail("methods", "no method is indexed")
    extractor_names = known_extractors() if known_extractors else None
    for name, info in methods.items():
        field = f"methods.{name}"
        if not isinstance(info, dict):
            raise check.fail(field, f"expected an object, got {type(info).__name__}")
        if extractor_names is not None:
            check.choice(info, "extractor", f"{field}.extractor", extractor_names)
        else:
            check.get(info, "extractor", f"{field}.extractor", str)
        check.get(info, "config", f"{field}.config", dict)
        check.integer(info, "dim", f"{field}.dim", 1)
        check.choice(info, "metric", f"{field}.metric", METRICS)
        index_type = (
            check.choice(info, "index_type", f"{field}.index_type", INDEX_TYPES) if "index_type" in info else "flat"
        )
        if "index_params" in info:
            check.get(info, "index_params", f"{field}.index_params", dict)
        method_files = check.get(info, "files", f"{field}.files", dict)
        needed = ["descriptors"] + (["index"] if index_type != "flat" else [])
        for role in needed:
            if role not in method_files:
                raise check.fail(f"{field}.files.{role}", "missing")
        for role, file_name in method_files.items():
            if not isinstance(file_name, str) or file_name not in files:
                raise check.fail(f"{field}.files.{role}", f"{file_name!r} is not listed in files with a checksum")
    used = {records} | {f for m in methods.values() for f in m["files"].values()}
    unused = sorted(set(files) - used)
    if unused:
        raise check.fail(f"files.{unused[0]}", "listed but used by no method (a method's entry was removed?)")
    if count == 0 and any(m.get("index_type", "flat") != "flat" for m in methods.values()):
        raise check.fail("count", "an empty bundle cannot hold an approximate index")
    build = manifest.get("build", {})
    if not isinstance(build, dict):
        raise check.fail("build", f"expected an object, got {type(build).__name__}")
    try:
        dicom_windows(build.get("dicom_windows"))
    except CbmirError as exc:
        raise check.fail("build.dicom_windows", str(exc)) from exc
    return manifest
