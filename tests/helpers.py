"""Helpers shared by the test modules: where the shared data lies, and small real inputs made on the fly."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBMIR_SHARED_DATA", REPO.parent / "shared" / "data"))
UNIFESP = SHARED / "unifesp_bodypart"
MEDNIST_ZIP = SHARED / "mednist" / "mednist_58954_jpeg.zip"
PNEUMONIA = SHARED / "pneumoniamnist" / "pneumoniamnist.npz"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} not found; set CBMIR_SHARED_DATA to the folder holding it")
    return path


def dicom_data_dir() -> str:
    """The folder of pydicom-data's test files."""
    import data_store

    return os.path.join(os.path.dirname(data_store.__file__), "data")


def synthetic_dicom(pixels: np.ndarray, photometric: str, **extra: object) -> bytes:
    """An uncompressed 16-bit DICOM file of ``pixels`` with extra header fields."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PatientID = "CR", "patient-42"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def subset_csv(labels: Path, out: Path, rows: slice) -> Path:
    """A labels CSV with the given slice of the rows of ``labels``."""
    with open(labels, newline="") as fh:
        reader = csv.DictReader(fh)
        picked = list(reader)[rows]
        fields = reader.fieldnames
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(picked)
    return out


def real_png(seed: int) -> bytes:
    """A valid 40x48 random grayscale PNG."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((48, 40)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def serve_subprocess(bundle: Path, timeout: float = 120.0) -> tuple[subprocess.Popen[str], str]:
    """A real ``cbmir serve`` process on a free port, returned once its health is SERVING: (process, target)."""
    import grpc

    from cbmir.client import RetrievalClient

    proc = subprocess.Popen(
        [sys.executable, "-m", "cbmir.cli", "serve", "--index", str(bundle), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    target = proc.stdout.readline().strip().rsplit(" on ", 1)[1]  # type: ignore[union-attr]
    client = RetrievalClient(target, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.health() == "SERVING":
                return proc, target
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"cbmir serve --index {bundle} never became SERVING")
