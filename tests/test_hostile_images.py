"""Decompression bombs and formats the API does not promise, against a live server (hostile-input issue)."""

from __future__ import annotations

import io
import resource
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset, write_file_meta_info
from pydicom.uid import generate_uid

from cbmir.client import RetrievalClient
from cbmir.errors import InvalidInputError
from cbmir.extractors.imaging import decode_dicom
from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server
from tests.helpers import synthetic_dicom

DEFLATED = "1.2.840.10008.1.2.1.99"


def deflated_bomb(frames: int, rows: int = 512, cols: int = 512, claimed_frames: int | None = None) -> bytes:
    """A Deflated-transfer-syntax DICOM whose data set inflates to frames x rows x cols x 2 bytes of zeros,
    built without ever holding the inflated bytes; its header may claim another frame count."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DEFLATED
    ds = Dataset()
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "OT", 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, claimed_frames or frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    size = frames * rows * cols * 2
    header = body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [deflater.compress(header)]
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        chunks.append(deflater.compress(zeros))
    chunks.append(deflater.compress(bytes(size & ((1 << 20) - 1))) + deflater.flush())
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    return out.getvalue() + b"".join(chunks)


@pytest.fixture(scope="module")
def target(small_bundle: Path):
    running = start_server(
        ServerConfig(index=str(small_bundle), port=0, device="cpu", default_method="hog"), wait_ready=True
    )
    yield f"127.0.0.1:{running.port}", running
    running.stop(0)


def test_a_deflated_dicom_bomb_is_refused_before_it_inflates(target) -> None:
    address, running = target
    honest = deflated_bomb(600)  # 300 MiB of pixels in about 300 KB, and the header says so
    lying = deflated_bomb(600, claimed_frames=1)  # the header claims one frame; the data inflate to 300 MiB
    assert len(honest) < 2_000_000 and len(lying) < 2_000_000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with RetrievalClient(address) as client:
        for bomb, message in (
            (
                honest,
                "600 frame(s) of 512x512x1 at 16 bits decode to 314572800 bytes, over the limit of 256000000 bytes",
            ),
            (lying, "inflates to more than the limit of 1638400 bytes that its header allows"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                client.search_image(bomb, k=3)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 64, f"peak RSS grew {grown_mib:.0f} MiB (the old decoder inflated 1 GB and more)"
    assert "INTERNAL" not in running.service.stats.errors


def test_multi_frame_pixel_data_is_bounded_by_its_header(tmp_path: Path) -> None:
    ok = synthetic_dicom(np.zeros((8, 8), np.uint16), "MONOCHROME2")
    assert decode_dicom(ok)[0].shape == (8, 8)
    small_deflated = deflated_bomb(3, 16, 16)  # inflates to 1.5 KB: decodes
    image, _ = decode_dicom(small_deflated)
    assert image.shape == (16, 16)
    with pytest.raises(InvalidInputError, match="1000 frame\\(s\\) of 512x512x1 at 16 bits decode to 524288000 bytes"):
        decode_dicom(deflated_bomb(1000))
    claims_2000_frames = synthetic_dicom(np.zeros((512, 512), np.uint16), "MONOCHROME2", NumberOfFrames=2000)
    with pytest.raises(InvalidInputError, match="2000 frame\\(s\\) of 512x512x1 at 16 bits decode to 1048576000"):
        decode_dicom(claims_2000_frames)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "PCX", "TGA", "JPEG2000", "PPM"])
def test_formats_the_api_does_not_promise_are_refused_by_name(target, fmt: str) -> None:
    address, _ = target
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(buf, format=fmt)
    with RetrievalClient(address) as client, pytest.raises(grpc.RpcError) as err:
        client.search_image(buf.getvalue(), k=3)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send PNG, JPEG or DICOM" in err.value.details()
    for png_or_jpeg in ("PNG", "JPEG"):
        good = io.BytesIO()
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(good, format=png_or_jpeg)
        assert len(RetrievalClient(address).search_image(good.getvalue(), k=3)) == 3


TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
]


def claims_many_frames(transfer_syntax: str, frames: int = 2000) -> bytes:
    """A small DICOM file of the given transfer syntax whose header claims frames x 512 x 512 x 16-bit pixels."""
    from pydicom.dataset import FileDataset
    from pydicom.encaps import encapsulate

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset("bomb.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "OT", 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    native = transfer_syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
    ds.PixelData = bytes(512 * 512 * 2) if native else encapsulate([b"\xff\xd8\xff\xd9" * 64])
    ds["PixelData"].VR = "OW" if native else "OB"
    buf = DicomBytesIO()
    big = transfer_syntax == "1.2.840.10008.1.2.2"
    dcmwrite(
        buf, ds, implicit_vr=transfer_syntax == "1.2.840.10008.1.2", little_endian=not big, enforce_file_format=True
    )
    return buf.getvalue()


@pytest.mark.parametrize("transfer_syntax", [*TRANSFER_SYNTAXES, DEFLATED])
def test_dicom_bombs_of_every_transfer_syntax_are_refused_from_the_header(target, transfer_syntax: str) -> None:
    address, running = target
    bomb = deflated_bomb(2000) if transfer_syntax == DEFLATED else claims_many_frames(transfer_syntax)
    assert len(bomb) < 2_000_000
    with RetrievalClient(address) as client, pytest.raises(grpc.RpcError) as err:
        client.search_image(bomb, k=3)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2000 frame(s) of 512x512x1 at 16 bits decode to 1048576000 bytes" in err.value.details()
    assert "INTERNAL" not in running.service.stats.errors
