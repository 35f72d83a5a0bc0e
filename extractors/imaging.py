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
import zlib
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
    if windows is not None and not isinstance(windows, Mapping):
        raise InvalidInputError(f"windows must map a modality to (centre, width), got {type(windows).__name__}")
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


QUERY_FORMATS = ("PNG", "JPEG")
"""Pillow formats a query may use (besides DICOM): the ones the API promises."""
ARCHIVE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
"""Pillow formats an archive may hold (besides DICOM): an archive is the operator's own data."""

_MAGIC = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\0", "TIFF"),
    (b"MM\0*", "TIFF"),
    (b"\0\0\0\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"DDS ", "DDS"),
    (b"\x0a", "PCX"),
    (b"8BPS", "PSD"),
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8", "JPEG"),
)


def sniff_format(data: bytes) -> str:
    """A best guess of an image's format from its first bytes, for messages (``unknown`` when none fits)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), "unknown")


def decode_image(
    data: bytes,
    *,
    source: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    windows: DicomWindows = NO_WINDOWS,
    formats: Sequence[str] = QUERY_FORMATS,
) -> np.ndarray:
    """Decode DICOM bytes or an image of one of ``formats`` (detected from content) to 2-D float32 in [0, 1].

    ``windows`` are the default VOI windows for DICOM files without their own (see :func:`decode_dicom`). Only the
    Pillow plugins of ``formats`` ever see the bytes; other formats are refused by name.

    Raises:
        InvalidInputError: the bytes are empty, not a supported image, corrupt, or too large.
    """
    if not data:
        raise InvalidInputError(f"{source}: empty image; send the PNG, JPEG or DICOM file's bytes")
    if is_dicom(data):
        image, _ = decode_dicom(data, source=source, max_pixels=max_pixels, windows=windows)
        return image
    try:
        with warnings.catch_warnings():  # Pillow's own size warning: the size is checked against max_pixels below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=list(formats))
        with opened as img:
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
    except UnidentifiedImageError as exc:
        kind = sniff_format(data)
        if kind == "unknown":
            what = "cannot decode image: not a known image format"
        elif kind in formats:
            what = f"cannot decode image: a corrupt {kind}"
        else:
            what = f"cannot decode image: {kind} is not accepted here"
        raise InvalidInputError(f"{source}: {what}; send {', '.join(formats)} or DICOM (Part 10) bytes") from exc
    except Image.DecompressionBombError as exc:
        pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # raised only while Pillow's limit is set
        raise InvalidInputError(
            f"{source}: image of more than {pillow_limit} pixels exceeds the limit of "
            f"{min(max_pixels, pillow_limit)} pixels; downscale it"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInputError(
            f"{source}: cannot decode image ({exc}); send {', '.join(formats)} or DICOM (Part 10) bytes"
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
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds, pixels = _dicom_frame(data, source, max_pixels)
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


def dicom_hounsfield(data: bytes, *, source: str = "dicom", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """A CT file's middle frame in Hounsfield units (modality LUT applied, no window), for re-windowing.

    Returns:
        (H, W) float32 HU, or ``None`` when the file is not a grey (MONOCHROME2) CT image: other modalities carry
        no calibrated units a window preset could refer to.

    Raises:
        InvalidInputError: the bytes are not a readable DICOM file or are over the size limits.
    """
    from pydicom.pixels import apply_modality_lut

    try:
        ds, pixels = _dicom_frame(data, source, max_pixels)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if str(ds.get("Modality", "")).upper() != "CT" or pixels.ndim != 2 or photometric != "MONOCHROME2":
            return None
        if str(ds.get("RescaleType", "HU")).upper() != "HU":
            return None
        values = apply_modality_lut(pixels, ds).astype(np.float32)
    except InvalidInputError:
        raise
    except Exception as exc:  # pydicom raises many unrelated types for corrupt files
        raise InvalidInputError(f"{source}: cannot decode DICOM ({type(exc).__name__}: {exc})") from exc
    if not np.isfinite(values).all():
        raise InvalidInputError(f"{source}: the CT values are not finite; re-export the file")
    return values


def _dicom_frame(data: bytes | str, source: str, max_pixels: int) -> tuple[Any, np.ndarray]:
    """The parsed data set (size-checked from its header first) and its middle frame's stored pixels."""
    _pydicom()  # configured once (lenient reading, quiet logs)
    if isinstance(data, str):
        with open(data, "rb") as fh:
            data = fh.read()
    ds = _read_dicom_bounded(data, source, max_pixels)
    frames = _check_pixel_header(ds, source, max_pixels)
    index = frames // 2 if frames > 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.pixel_array_options(index=index)  # decode only the middle frame
        return ds, ds.pixel_array


def max_decoded_bytes(max_pixels: int) -> int:
    """Most bytes one query's decoded DICOM pixel data may take: four bytes per allowed pixel (256 MiB by
    default), so a multi-frame file may hold many frames of a normal size but no decompression bomb."""
    return 4 * max_pixels


DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"


def _declared_pixel_bytes(ds: Any) -> int:
    """Bytes of native pixel data the header declares: frames x rows x columns x samples x bytes per sample."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    return frames * rows * cols * samples * ((bits + 7) // 8)


def _check_pixel_header(ds: Any, source: str, max_pixels: int) -> int:
    """Refuse a frame over ``max_pixels`` or pixel data over :func:`max_decoded_bytes`, from the header alone.

    Returns:
        The number of frames.
    """
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(cols, rows, max_pixels, source)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    decoded = _declared_pixel_bytes(ds)
    if decoded > max_decoded_bytes(max_pixels):
        raise InvalidInputError(
            f"{source}: {frames} frame(s) of {cols}x{rows}x{samples} at {bits} bits decode to {decoded} bytes, "
            f"over the limit of {max_decoded_bytes(max_pixels)} bytes; send fewer frames"
        )
    return frames


PIXEL_DATA_TAG = 0x7FE00010
INFLATE_CHUNK = 1 << 16


def _read_dicom_bounded(data: bytes, source: str, max_pixels: int) -> Any:
    """Parse DICOM bytes; a Deflated-transfer-syntax data set is inflated only as far as its header allows.

    pydicom would inflate a deflated data set whole before any header could be checked: a 1 MB file can hold
    gigabytes of zeros. Here the file meta group is read on its own, the first 64 KiB inflated and the pixel
    header checked (:func:`_check_pixel_header`), then the rest inflated with a hard bound and parsed.
    """
    max_bytes = max_decoded_bytes(max_pixels)
    pydicom = _pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset
    from pydicom.uid import ExplicitVRLittleEndian

    stream = io.BytesIO(data)
    stream.name = source  # pydicom's messages name the file, not "<_io.BytesIO object at 0x...>"
    stream.seek(132)
    meta = read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, *_: tag.group != 2)
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_TRANSFER_SYNTAX:
        stream.seek(0)
        return pydicom.dcmread(stream)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    chunks = [inflater.decompress(data[stream.tell() :], INFLATE_CHUNK)]
    try:
        header = read_dataset(
            io.BytesIO(chunks[0]),
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=lambda tag, *_: tag == PIXEL_DATA_TAG,
        )
    except Exception:  # a header longer than the first chunk: the hard bound below still holds
        header = None
    limit = max_bytes
    if header is not None:
        _check_pixel_header(header, source, max_pixels)
        # the data set may hold the header, the pixels it declares and some trailing elements, no more
        limit = min(max_bytes, INFLATE_CHUNK + _declared_pixel_bytes(header) + (1 << 20))
    size = len(chunks[0])
    while inflater.unconsumed_tail and size <= limit:
        chunks.append(inflater.decompress(inflater.unconsumed_tail, INFLATE_CHUNK * 16))
        size += len(chunks[-1])
    if size > limit or inflater.unconsumed_tail:
        raise InvalidInputError(
            f"{source}: the deflated DICOM data set inflates to more than the limit of {limit} bytes that its header "
            "allows; send it uncompressed or with an image codec"
        )
    inflated = b"".join(chunks)
    del chunks
    ds = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    file_meta = FileMetaDataset(meta)
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = file_meta
    return ds


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
