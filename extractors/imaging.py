"""Image decoding and the preprocessing every extractor shares.

Every image inside cbmir is a 2-D ``float32`` array in ``[0, 1]`` (grayscale, brightest = 1). This module turns
encoded bytes (PNG, JPEG, DICOM, detected from content), DICOM datasets and raw pixel arrays into that form, and
resizes batches of them to a common square size. Extractors replicate grayscale to 3 channels where a backbone
needs it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from cbmir.defaults import DEFAULT_MAX_PIXELS
from cbmir.errors import InvalidInputError, shown

DicomWindows = Mapping[str, tuple[float, float]]
"""Modality -> (window centre, window width) applied to DICOM files that carry no VOI window of their own, in
modality-LUT units (e.g. ``{"CT": (40, 400)}`` for a soft-tissue CT window). Empty: such files are min-max
stretched. Windows belong to a bundle (recorded in its manifest, ``--dicom-window CT=40,400`` at build time) and
are passed to every decode explicitly; there is no process-wide default."""

NO_WINDOWS: DicomWindows = MappingProxyType({})

DICOM_HEADER_FIELDS = ("Modality", "BodyPartExamined", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
PATIENT_ID_SALT = b"cbmir-patient-v1"


def dicom_windows(windows: Mapping[str, Sequence[float]] | None) -> DicomWindows:
    """A validated, read-only :data:`DicomWindows` (modalities upper-cased) from ``{"CT": (40, 400)}``-like input."""
    out: dict[str, tuple[float, float]] = {}
    for modality, values in (windows or {}).items():
        try:
            centre, width = (float(v) for v in values)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"window for {modality} must be (centre, width), got {values!r}") from exc
        if not width > 0:
            raise InvalidInputError(f"window width for {modality} must be positive, got {width}")
        out[str(modality).upper()] = (centre, width)
    return MappingProxyType(out)


def parse_windows(items: Sequence[str] | None) -> DicomWindows:
    """``["CT=40,400", "MR=300,600"]`` -> ``{"CT": (40.0, 400.0), "MR": (300.0, 600.0)}``."""
    out: dict[str, tuple[float, float]] = {}
    for item in items or []:
        try:
            modality, values = item.split("=", 1)
            centre, width = (float(v) for v in values.split(","))
        except ValueError as exc:
            raise InvalidInputError(f"--dicom-window {item!r}: use MODALITY=CENTRE,WIDTH, e.g. CT=40,400") from exc
        out[modality.strip().upper()] = (centre, width)
    return dicom_windows(out)


def is_dicom(data: bytes) -> bool:
    """True when ``data`` starts like a DICOM Part 10 file (128-byte preamble then ``DICM``)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def to_unit_gray(pixels: np.ndarray) -> np.ndarray:
    """Convert a 2-D or colour (H, W, 3|4) array to a 2-D float32 image in [0, 1].

    ``uint8`` is divided by 255; every other type is min-max stretched (a constant image becomes zeros), since
    16-bit and float medical images rarely use their full range. Non-finite values are rejected.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if np.asarray(pixels).dtype == np.uint8:
            return np.clip(arr / 255.0, 0.0, 1.0).astype(np.float32)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InvalidInputError(f"expected a 2-D grayscale or (H, W, 3) colour image, got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InvalidInputError(f"image is too small ({arr.shape[1]}x{arr.shape[0]}); send at least 2x2 pixels")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) * np.float32(1.0 / 255.0)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InvalidInputError("image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr)
    return (arr - lo) * np.float32(1.0 / (hi - lo))


def _check_size(width: int, height: int, max_pixels: int, source: str) -> None:
    if width * height > max_pixels:
        raise InvalidInputError(
            f"{source}: image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels; downscale it"
        )


def decode_image(
    data: bytes, *, source: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS, windows: DicomWindows = NO_WINDOWS
) -> np.ndarray:
    """Decode PNG, JPEG or DICOM bytes (detected from content) to a 2-D float32 image in [0, 1].

    ``windows`` are the default VOI windows for DICOM files without their own (see :func:`decode_dicom`).

    Raises:
        InvalidInputError: the bytes are empty, not a supported image, corrupt, or too large.
    """
    if not data:
        raise InvalidInputError(f"{source}: empty image; send the PNG, JPEG or DICOM file's bytes")
    if is_dicom(data):
        image, _ = decode_dicom(data, source=source, max_pixels=max_pixels, windows=windows)
        return image
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_size(img.width, img.height, max_pixels, source)
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                pixels = np.asarray(img)
            elif img.mode == "L":
                pixels = np.asarray(img)
            else:
                pixels = np.asarray(img.convert("L"))
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(
            f"{source}: cannot decode image ({exc}); send PNG, JPEG or DICOM (Part 10) bytes"
        ) from exc
    return to_unit_gray(pixels)


def decode_dicom(
    data: bytes | str,
    *,
    source: str = "dicom",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    windows: DicomWindows = NO_WINDOWS,
) -> tuple[np.ndarray, dict[str, str]]:
    """Decode a DICOM file (bytes or path) to a windowed 2-D image in [0, 1] and its header metadata.

    The modality LUT and the VOI window (or VOI LUT) from the file are applied; without one, the default window of
    the file's modality in ``windows`` (:data:`DicomWindows`) if given, else a min-max stretch. MONOCHROME1 is inverted so bone is
    bright. Colour images (pydicom returns YBR data as RGB) and palette images become luminance. Multi-frame images
    are indexed by their middle frame: one record per file keeps ids, hashes and metadata one-to-one with files, and
    the middle frame of a cine or multi-phase series is the most representative single view.
    """
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        stream: Any = data
        if isinstance(data, bytes):
            stream = io.BytesIO(data)
            stream.name = source  # pydicom's messages name the file, not "<_io.BytesIO object at 0x...>"
        ds = pydicom.dcmread(stream)
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        _check_size(cols, rows, max_pixels, source)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        index = frames // 2 if frames > 1 else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array if index is None else ds.pixel_array[index]
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            pixels = apply_color_lut(pixels, ds)
        if pixels.ndim == 2:
            pixels = apply_modality_lut(pixels, ds)
            default = windows.get(str(ds.get("Modality", "")).upper())
            if "WindowCenter" in ds or "VOILUTSequence" in ds:
                pixels = apply_voi_lut(pixels, ds, index=0)
                image = to_unit_gray(pixels.astype(np.float32))
            elif default is not None:
                centre, width = default
                image = np.clip((pixels.astype(np.float32) - (centre - width / 2)) / width, 0.0, 1.0)
            else:
                image = to_unit_gray(pixels.astype(np.float32))
            if photometric == "MONOCHROME1":
                image = 1.0 - image
        else:
            image = to_unit_gray(pixels)
    except InvalidInputError:
        raise
    except Exception as exc:  # pydicom raises many unrelated types for corrupt files
        raise InvalidInputError(f"{source}: cannot decode DICOM ({type(exc).__name__}: {exc})") from exc
    return image.astype(np.float32), dicom_metadata(ds)


@functools.cache
def _pydicom() -> Any:
    """pydicom, imported on first use and set once to read lenient files quietly."""
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    return pydicom


def dicom_metadata(ds: Any) -> dict[str, str]:
    """Header fields usable as search filters; the patient id only as a salted SHA-256 prefix."""
    meta = {field: str(ds.get(field)) for field in DICOM_HEADER_FIELDS if ds.get(field) not in (None, "")}
    if "Modality" in meta:
        meta["modality"] = meta["Modality"]
    if "BodyPartExamined" in meta:
        meta["body_region"] = meta["BodyPartExamined"].lower()
    patient = ds.get("PatientID")
    if patient:
        meta["patient_id"] = hashlib.sha256(PATIENT_ID_SALT + str(patient).encode()).hexdigest()[:16]
    return meta


def pixels_from_buffer(width: int, height: int, dtype: str, data: bytes) -> np.ndarray:
    """Build an image from a raw row-major pixel buffer (``uint8``, ``uint16`` or ``float32``, little-endian)."""
    allowed: dict[str, np.dtype[Any]] = {
        "uint8": np.dtype(np.uint8),
        "uint16": np.dtype("<u2"),
        "float32": np.dtype("<f4"),
    }
    if dtype not in allowed:
        raise InvalidInputError(f"unsupported pixel dtype {shown(dtype)}; use one of {sorted(allowed)}")
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"pixel array needs positive width and height, got {width}x{height}")
    itemsize = allowed[dtype].itemsize
    expected = width * height * itemsize
    if len(data) != expected:
        raise InvalidInputError(f"pixel buffer has {len(data)} bytes but {width}x{height} {dtype} needs {expected}")
    return to_unit_gray(np.frombuffer(data, dtype=allowed[dtype]).reshape(height, width))


def resize_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Resize 2-D images to ``size`` x ``size`` (area interpolation when shrinking, bilinear when enlarging).

    Args:
        images: N arrays of shape (H_i, W_i), float32 in [0, 1].
        size: output side length.

    Returns:
        (N, size, size) float32.
    """
    out = np.empty((len(images), size, size), dtype=np.float32)
    for i, img in enumerate(images):
        if img.shape == (size, size):
            out[i] = img
            continue
        shrink = img.shape[0] > size or img.shape[1] > size
        out[i] = cv2.resize(
            np.ascontiguousarray(img, dtype=np.float32),
            (size, size),
            interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
        )
    return out
