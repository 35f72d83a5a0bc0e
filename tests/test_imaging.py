import io
import os
import struct
import warnings
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image

from cbmir.errors import InvalidInputError
from cbmir.extractors.imaging import decode_dicom, decode_image, pixels_from_buffer, resize_batch, to_unit_gray
from tests.helpers import dicom_data_dir, synthetic_dicom


def test_dicom_window_and_monochrome1_inversion_by_hand():
    pixels = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    # Rescale: HU = 2 * p - 100 -> [-100, 100, 300, 500]; window centre 200, width 401 clips to [0, 400].
    data = synthetic_dicom(
        pixels, "MONOCHROME2", RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200, WindowWidth=401
    )
    image, meta = decode_dicom(data)
    np.testing.assert_allclose(image, [[0.0, 0.25], [0.75, 1.0]], atol=0.01)
    inverted, _ = decode_dicom(synthetic_dicom(pixels, "MONOCHROME1"))
    np.testing.assert_allclose(inverted, [[1.0, 2 / 3], [1 / 3, 0.0]], atol=1e-6)
    assert meta["Modality"] == "CR" and meta["modality"] == "CR"
    assert "patient-42" not in meta["patient_id"] and len(meta["patient_id"]) == 16


def test_compressed_dicom_decodes_like_its_uncompressed_twin():
    base = dicom_data_dir()
    lossless, _ = decode_dicom(os.path.join(base, "RG1_J2KR.dcm"))
    plain, meta = decode_dicom(os.path.join(base, "RG1_UNCR.dcm"))
    np.testing.assert_array_equal(lossless, plain)
    assert meta["BodyPartExamined"] == "CHEST" and plain.shape == (1955, 1841)
    # MONOCHROME1 radiograph: after inversion the (air-filled) lungs are darker than the image average.
    centre_left = plain[700:1100, 300:700].mean()
    assert centre_left < plain.mean()


def test_multiframe_dicom_uses_middle_frame():
    path = os.path.join(dicom_data_dir(), "emri_small.dcm")
    image, _ = decode_dicom(path)
    frames = pydicom.dcmread(path).pixel_array
    assert image.shape == frames.shape[1:]
    corr = [np.corrcoef(image.ravel(), f.ravel())[0, 1] for f in frames]
    assert int(np.argmax(corr)) == len(frames) // 2


def test_png_8_and_16_bit_and_bytes_detection():
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 255], [128, 64]], dtype=np.uint8)).save(buf, format="PNG")
    np.testing.assert_allclose(decode_image(buf.getvalue()), [[0, 1], [128 / 255, 64 / 255]], atol=1e-6)
    buf16 = io.BytesIO()
    Image.fromarray(np.array([[1000, 3000], [2000, 1000]], dtype=np.uint16)).save(buf16, format="PNG")
    np.testing.assert_allclose(decode_image(buf16.getvalue()), [[0, 1], [0.5, 0]], atol=1e-6)
    dicom = synthetic_dicom(np.array([[0, 10], [20, 30]], dtype=np.uint16), "MONOCHROME2")
    np.testing.assert_allclose(decode_image(dicom), [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"\x89PNG\r\n\x1a\n" + b"\0" * 50, b"\0" * 128 + b"DICM" + b"\xff" * 40],
    ids=["empty", "text", "truncated-png", "broken-dicom"],
)
def test_undecodable_bytes_raise_invalid_input(data):
    with pytest.raises(InvalidInputError):
        decode_image(data)


def test_decompression_bomb_is_refused():
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG")
    with pytest.raises(InvalidInputError, match="exceeds the limit"):
        decode_image(buf.getvalue(), max_pixels=1_000_000)


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` 8-bit gray pixels, with an empty image data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("side", "claimed"),
    [(10_000, "10000x10000 pixels"), (20_000, "more than 178956970 pixels")],
    ids=["past-pillow-warning", "past-pillow-error"],
)
def test_a_claimed_size_past_pillows_own_limits_gets_the_same_refusal(side: int, claimed: str) -> None:
    """Pillow warns above 89 M pixels and raises above 179 M; either way the refusal is ours, without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInputError, match=f"image of {claimed} exceeds the limit of 5000000 pixels"):
            decode_image(png_header_claiming(side, side), max_pixels=5_000_000)


def test_raw_pixel_buffers_and_grayscale_conversion():
    img = pixels_from_buffer(3, 2, "uint8", bytes([0, 51, 102, 153, 204, 255]))
    np.testing.assert_allclose(img, [[0, 0.2, 0.4], [0.6, 0.8, 1.0]], atol=1e-6)
    with pytest.raises(InvalidInputError, match="needs 12"):
        pixels_from_buffer(3, 2, "uint16", b"\0" * 11)
    with pytest.raises(InvalidInputError, match="dtype"):
        pixels_from_buffer(3, 2, "int64", b"\0" * 48)
    with pytest.raises(InvalidInputError, match="NaN"):
        to_unit_gray(np.array([[np.nan, 1.0], [0.0, 1.0]], dtype=np.float32))
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    np.testing.assert_allclose(to_unit_gray(rgb), 0.587, atol=1e-3)
    assert resize_batch([np.zeros((10, 30), np.float32), np.ones((300, 20), np.float32)], 64).shape == (2, 64, 64)
