"""The offline phase: read an archive, extract descriptors in batches, write a versioned index bundle."""

from .archive import Archive, ArchiveEntry, ImageRecord, open_archive
from .build import BuildReport, build_bundle
from .bundle import Bundle, MethodIndex, load_bundle
from .update import UpdateReport, add_to_bundle, remove_from_bundle

__all__ = [
    "Archive",
    "ArchiveEntry",
    "Bundle",
    "BuildReport",
    "ImageRecord",
    "MethodIndex",
    "UpdateReport",
    "add_to_bundle",
    "build_bundle",
    "load_bundle",
    "open_archive",
    "remove_from_bundle",
]
