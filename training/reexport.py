"""Re-exporting an image the way another hospital's scanner and PACS would: the site-shift family.

One definition serves the ``cbmir eval --shift`` protocol (queries re-exported) and training (``--site-shift`` and
``--self-supervised`` augment with the same changes). The changes and why their ranges are realistic:

- ``windows``: a different window/level. CT whose Hounsfield units are at hand (a DICOM archive) is re-windowed
  from them with one of the clinical presets in :data:`CT_WINDOW_PRESETS`, its centre moved by up to 10% of the
  width and its width scaled by 0.8-1.25 (each site tunes its presets). Otherwise the window is applied to the
  8-bit image: centre 0.35-0.65 and width 0.5-1.3 of the grey range (sites export CT and radiographs with their
  own VOI presets; widths beyond 1 flatten contrast).
- ``gamma``: gamma 0.6-1.6, log-uniform (display LUTs and vendor post-processing curves).
- ``jpeg``: re-encoding at JPEG quality 30-95 (lossy exports and teleradiology gateways; 30 is a poor gateway).
- ``resize``: down-sampling to 35-80% of the side with area averaging, then back up (lower-resolution exports and
  detector binning).
- ``noise``: Gaussian sensor noise, sigma 0.5-3% of the grey range (lower dose, other detectors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import cv2
import numpy as np

from cbmir.errors import InvalidInputError

SHIFTS = ("windows", "gamma", "jpeg", "resize", "noise")

CT_WINDOW_PRESETS: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "brain": (40.0, 80.0),
        "subdural": (75.0, 215.0),
        "stroke": (35.0, 40.0),
        "soft tissue": (50.0, 400.0),
        "mediastinum": (50.0, 350.0),
        "liver": (60.0, 160.0),
        "lung": (-600.0, 1500.0),
        "bone": (400.0, 1800.0),
    }
)
"""Window presets (centre, width) in Hounsfield units that CT workstations ship and sites export with."""


def parse_shifts(spec: str) -> list[str]:
    """``windows,gamma`` -> the listed changes, in the protocol's order; ``all`` is every one."""
    names = list(SHIFTS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SHIFTS))
    if unknown or not names:
        raise InvalidInputError(f"--shift {spec!r}: choose from {', '.join(SHIFTS)} (comma-separated) or all")
    return [s for s in SHIFTS if s in names]


def ct_window(hounsfield: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CT values (H, W) in HU shown through a random, jittered preset of :data:`CT_WINDOW_PRESETS`: (H, W) in [0, 1]."""
    centre, width = list(CT_WINDOW_PRESETS.values())[int(rng.integers(len(CT_WINDOW_PRESETS)))]
    centre += rng.uniform(-0.1, 0.1) * width
    width *= float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    return np.clip((np.asarray(hounsfield, np.float32) - (centre - width / 2)) / width, 0.0, 1.0)


def shift_image(
    image: np.ndarray,
    shifts: Sequence[str],
    rng: np.random.Generator,
    hounsfield: np.ndarray | None = None,
) -> np.ndarray:
    """One re-export of a 2-D float32 image in [0, 1]; the result is 2-D float32 in [0, 1] of the same size.

    Args:
        image: (H, W) float32 in [0, 1], as the archive shows it.
        shifts: names from :data:`SHIFTS`.
        rng: source of every change's parameters.
        hounsfield: (H, W) CT values in HU behind ``image`` when known; ``windows`` then re-windows from them.
    """
    x = np.asarray(image, dtype=np.float32)
    h, w = x.shape
    if hounsfield is not None and np.shape(hounsfield) != (h, w):
        raise InvalidInputError(f"hounsfield values of shape {np.shape(hounsfield)} do not match the image {(h, w)}")
    if "windows" in shifts:
        if hounsfield is not None:
            x = ct_window(hounsfield, rng)
        else:
            centre, width = rng.uniform(0.35, 0.65), rng.uniform(0.5, 1.3)
            x = np.clip((x - (centre - width / 2)) / width, 0.0, 1.0)
    if "gamma" in shifts:
        x = np.power(x, np.exp(rng.uniform(np.log(0.6), np.log(1.6)))).astype(np.float32)
    if "resize" in shifts:
        scale = rng.uniform(0.35, 0.8)
        small = cv2.resize(x, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if "noise" in shifts:
        x = x + rng.normal(0.0, rng.uniform(0.005, 0.03), x.shape).astype(np.float32)
    x = np.clip(x, 0.0, 1.0)
    if "jpeg" in shifts:
        quality = int(rng.integers(30, 96))
        ok, data = cv2.imencode(".jpg", np.round(x * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        decoded = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
        if decoded is None:
            raise RuntimeError("JPEG decoding failed")
        x = decoded.astype(np.float32) / 255.0
    return np.ascontiguousarray(x, dtype=np.float32)


def random_reexport(images: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Each image re-exported with its own random subset of the changes (each drawn with probability ``p``).

    Args:
        images: (B, H, W) float32 in [0, 1].
        rng: source of the subsets and of every change's parameters.
        p: probability of each change.

    Returns:
        (B, H, W) float32 in [0, 1]; images that drew no change are returned as they were.
    """
    drawn = rng.random((len(images), len(SHIFTS))) < p
    out = np.array(images, dtype=np.float32, copy=True)
    for i in np.flatnonzero(drawn.any(axis=1)):
        out[i] = shift_image(out[i], [s for s, d in zip(SHIFTS, drawn[i], strict=True) if d], rng)
    return out
