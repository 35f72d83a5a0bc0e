"""DICOM ingestion on the real files of pydicom-data: transfer syntaxes, orientation and intensity checked against
the raw PixelData bytes, MONOCHROME1, default windows per modality, header metadata as filters."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cbmir.extractors.imaging import decode_dicom, dicom_windows
from tests.helpers import dicom_data_dir, synthetic_dicom


def data(name: str) -> str:
    return os.path.join(dicom_data_dir(), name)


def raw_frames(name: str, dtype: str) -> np.ndarray:
    """Pixels straight from the PixelData bytes of an uncompressed file, independent of any decoder."""
    ds = pydicom.dcmread(data(name))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return np.frombuffer(ds.PixelData, dtype=dtype).reshape(frames, ds.Rows, ds.Columns)


def stretch(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.min()) / (x.max() - x.min())


def test_orientation_and_intensity_match_the_raw_pixel_bytes() -> None:
    image, _ = decode_dicom(data("emri_small.dcm"))
    expected = stretch(raw_frames("emri_small.dcm", "<u2")[5])  # 10 frames: the middle one is index 5
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert not np.allclose(image, expected[::-1]) and not np.allclose(image, expected.T)
    assert np.unravel_index(image.argmax(), image.shape) == np.unravel_index(expected.argmax(), expected.shape)


@pytest.mark.parametrize(
    "twin",
    [
        "emri_small_RLE.dcm",
        "emri_small_big_endian.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
    ],
)
def test_lossless_transfer_syntaxes_decode_exactly_like_the_uncompressed_file(twin: str) -> None:
    plain, meta = decode_dicom(data("emri_small.dcm"))
    other, other_meta = decode_dicom(data(twin))
    np.testing.assert_array_equal(other, plain)
    assert other_meta["Modality"] == meta["Modality"] == "MR"


def test_lossy_jpeg2000_stays_close_to_the_original() -> None:
    lossless, _ = decode_dicom(data("MR2_J2KR.dcm"))
    lossy, _ = decode_dicom(data("MR2_J2KI.dcm"))
    assert lossy.shape == lossless.shape == (1024, 1024)
    assert np.abs(lossy - lossless).mean() < 0.02 and not np.array_equal(lossy, lossless)


def test_monochrome1_radiograph_is_windowed_and_inverted() -> None:
    image, meta = decode_dicom(data("RG1_UNCR.dcm"))
    ds = pydicom.dcmread(data("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and meta["Modality"] == "CR"
    raw = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns).astype(np.float64)
    centre = float(np.atleast_1d(ds.WindowCenter)[0])
    width = float(np.atleast_1d(ds.WindowWidth)[0])
    windowed = np.clip((raw - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)  # DICOM PS3.3 C.11.2.1.2 linear
    np.testing.assert_allclose(image, 1.0 - stretch(windowed), atol=2e-3)


def test_colour_and_palette_files_become_luminance() -> None:
    rgb, _ = decode_dicom(data("US1_UNCR.dcm"))
    ycc, _ = decode_dicom(data("US1_J2KR.dcm"))
    np.testing.assert_allclose(ycc, rgb, atol=2 / 255)
    palette, _ = decode_dicom(data("OBXXXX1A.dcm"))
    palette_rle, _ = decode_dicom(data("OBXXXX1A_rle.dcm"))
    assert palette.shape == (600, 800) and palette.std() > 0.05
    np.testing.assert_array_equal(palette_rle, palette)


def test_default_window_per_modality_applies_only_without_a_file_window() -> None:
    pixels = np.array([[0, 1000], [1040, 1240]], dtype=np.uint16)
    ct = synthetic_dicom(pixels, "MONOCHROME2", Modality="CT", RescaleSlope=1, RescaleIntercept=-1024)
    windows = dicom_windows({"ct": (40, 400)})
    image, _ = decode_dicom(ct, windows=windows)  # HU -1024, -24, 16, 216 through a 40/400 window [-160, 240]
    np.testing.assert_allclose(image, [[0.0, 136 / 400], [176 / 400, 376 / 400]], atol=1e-6)
    stretched, _ = decode_dicom(ct)  # no windows given: min-max stretch
    np.testing.assert_allclose(stretched, [[0.0, 1000 / 1240], [1040 / 1240, 1.0]], atol=1e-6)
    windowed = synthetic_dicom(pixels, "MONOCHROME2", Modality="CT", WindowCenter=600, WindowWidth=1201)
    own, _ = decode_dicom(windowed, windows=windows)
    assert own[0, 0] == 0.0 and own[1, 1] == 1.0  # the file's window wins, then the stretch


def test_two_bundles_with_different_windows_decode_one_dicom_differently_at_once(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from cbmir.index_build import build_bundle, load_bundle, open_archive
    from cbmir.server.search_engine import SearchEngine

    ramp = (np.arange(64 * 64).reshape(64, 64) % 1400).astype(np.uint16)  # HU -1024 .. 375
    (tmp_path / "ct").mkdir()
    for i in range(3):
        (tmp_path / "ct" / f"{i}.dcm").write_bytes(
            synthetic_dicom(
                np.roll(ramp, 7 * i, axis=1), "MONOCHROME2", Modality="CT", RescaleSlope=1, RescaleIntercept=-1024
            )
        )
    specs = {"soft": {"CT": (40, 400)}, "lung": {"CT": (-600, 1500)}}
    engines = {}
    for name, windows in specs.items():
        build_bundle(
            open_archive(tmp_path / "ct", windows=dicom_windows(windows)),
            tmp_path / name,
            {"hog": {}},
            device="cpu",
            progress=False,
        )
        engines[name] = SearchEngine(load_bundle(tmp_path / name), device="cpu")
        assert dict(engines[name].windows) == {"CT": tuple(float(v) for v in windows["CT"])}
    query = (tmp_path / "ct" / "1.dcm").read_bytes()
    hu = ramp.astype(np.float32) - 1024
    expected = {
        name: np.clip((hu - (c - w / 2)) / w, 0, 1)
        for name, ((c, w),) in ((n, tuple(s.values())) for n, s in specs.items())
    }
    expected = {n: np.roll(e, 7, axis=1) for n, e in expected.items()}
    jobs = [name for _ in range(40) for name in specs]
    with ThreadPoolExecutor(8) as pool:
        decoded = list(pool.map(lambda name: engines[name].decode(query), jobs))
    for name, image in zip(jobs, decoded):
        np.testing.assert_allclose(image, expected[name], atol=1e-6)
    assert not np.allclose(expected["soft"], expected["lung"])
    # each bundle's stored descriptor of that file is its own engine's description of the query
    for engine in engines.values():
        row = engine.bundle.row_of["1.dcm"]
        np.testing.assert_allclose(
            engine.describe("hog", [engine.decode(query)])[0], engine.method("hog").descriptors[row], atol=1e-5
        )


def test_dicom_folder_build_keeps_header_metadata_as_filters(tmp_path: Path) -> None:
    from cbmir.index_build import build_bundle, load_bundle, open_archive
    from cbmir.server.search_engine import SearchEngine

    names = ["emri_small.dcm", "RG1_UNCR.dcm", "US1_UNCR.dcm", "MR2_J2KR.dcm", "693_J2KR.dcm"]
    folder = tmp_path / "dicom" / "study"
    folder.mkdir(parents=True)
    for n in names:
        shutil.copy(data(n), folder / n)
    build_bundle(open_archive(tmp_path / "dicom"), tmp_path / "b", {"hog": {}}, device="cpu", progress=False)
    bundle = load_bundle(tmp_path / "b")
    assert len(bundle) == len(names)
    for field in ("Modality", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert all(bundle.metadata[field]), field
    assert sorted(bundle.metadata["Modality"]) == ["CR", "CT", "MR", "MR", "US"]
    engine = SearchEngine(bundle, device="cpu")
    mr = engine.allowed_rows({"Modality": ["MR"]})
    assert mr is not None and mr.mask.sum() == 2 and mr.filters == {"Modality": frozenset({"MR"})}
    raw_ids = {str(pydicom.dcmread(data(n), stop_before_pixels=True).get("PatientID", "")) for n in names}
    for hashed in bundle.metadata.get("patient_id", []):
        assert hashed == "" or (len(hashed) == 16 and hashed not in raw_ids)
