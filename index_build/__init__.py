"""The offline phase: read an archive, extract descriptors in batches, write a versioned index bundle."""

from .archive import Archive, ArchiveEntry, ImageRecord, open_archive
from .build import BuildReport, build_bundle
from .bundle import Bundle, MethodIndex, load_bundle

__all__ = ["Archive", "ArchiveEntry", "Bundle", "BuildReport", "ImageRecord", "MethodIndex", "build_bundle",
           "load_bundle", "open_archive"]
