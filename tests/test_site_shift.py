"""The site-shift protocol: realistic re-exports, reproducible, scored beside the unshifted queries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbmir.cli import main
from cbmir.errors import InvalidInputError
from cbmir.evaluation.protocols import score_rankings
from cbmir.evaluation.report import shift_table
from cbmir.evaluation.site_shift import evaluate_site_shift, read_query_image
from cbmir.extractors.imaging import dicom_windows
from cbmir.index_build import load_bundle
from cbmir.server.search_engine import SearchEngine
from cbmir.training.reexport import SHIFTS, parse_shifts, shift_image

from .helpers import real_png, synthetic_dicom


def test_each_shift_changes_the_image_within_range_and_reproducibly() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(0.5, 0.2, (96, 80)), 0, 1).astype(np.float32)
    for name in SHIFTS:
        a = shift_image(image, [name], np.random.default_rng(3))
        b = shift_image(image, [name], np.random.default_rng(3))
        assert a.shape == image.shape and a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - image).mean() > 1e-3, name


def test_shift_names_are_checked() -> None:
    assert parse_shifts("all") == list(SHIFTS)
    assert parse_shifts("noise,windows") == ["windows", "noise"]
    with pytest.raises(InvalidInputError, match="choose from windows, gamma, jpeg, resize, noise"):
        parse_shifts("windows,blur")


def test_unshifted_scores_equal_the_stored_descriptor_ranking(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    doc = evaluate_site_shift(bundle, ["hog"], ["label"], ["jpeg", "noise"], queries=40, seed=1, device="cpu")
    assert doc["queries"] == 40 and doc["shifts"] == ["jpeg", "noise"]
    rows = np.sort(np.random.default_rng(1).choice(len(bundle), size=40, replace=False))
    engine = SearchEngine(bundle, device="cpu")
    excluded = [np.asarray([r]) for r in rows]
    found = engine.search("hog", bundle.methods["hog"].descriptors[rows], 10, exclude=excluded).rows
    meta = {f: [c[r] for r in rows] for f, c in bundle.metadata.items()}
    expected = score_rankings(found, bundle.metadata, meta, excluded, "label")
    result = doc["results"][0]
    assert result["unshifted"]["P@1"] == expected["mP@k"][0]
    assert result["unshifted"]["seed_mAP"] == expected["seed_mAP"]
    assert 0.0 <= result["shifted"]["P@1"] <= 1.0


def test_cli_writes_the_shift_table(small_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    argv = ["eval", "--index", str(small_bundle), "--methods", "hog", "--shift", "gamma,resize"]
    assert main([*argv, "--shift-queries", "20", "--json", str(out), "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "site shift (gamma+resize, 20 queries, seed 0)" in printed and "| hog | label |" in printed
    assert json.loads(out.read_text())["site_shift"]["results"][0]["method"] == "hog"
    doc = json.loads(out.read_text())
    row = doc["site_shift"]["results"][0]
    table = shift_table(out)
    assert f"| hog | label | {row['unshifted']['P@1']:.3f} | {row['shifted']['P@1']:.3f} |" in table
    assert "Changes: gamma+resize; 20 queries, seed 0" in table


def _ct_phantom(tmp_path: Path, **extra: object) -> tuple[str, np.ndarray]:
    """A CT DICOM file of five tissue bands (air, lung, fat, soft tissue, bone: -1000..1000 HU) stored with the
    usual intercept of -1024 and shown by the archive through a narrow brain window, and its HU."""
    hounsfield = np.repeat(np.array([-1000, -700, -100, 40, 1000], dtype=np.float32), 8)[None, :].repeat(16, axis=0)
    fields: dict[str, object] = {"Modality": "CT", "RescaleSlope": 1, "RescaleIntercept": -1024}
    fields.update(extra)
    path = tmp_path / "ct.dcm"
    path.write_bytes(synthetic_dicom(hounsfield + 1024, "MONOCHROME2", **fields))
    return path.as_uri(), hounsfield


def test_ct_dicom_queries_are_rewindowed_from_their_hounsfield_units(tmp_path: Path) -> None:
    uri, hounsfield = _ct_phantom(tmp_path)
    image, values = read_query_image(uri, dicom_windows({"CT": (40, 80)}))
    np.testing.assert_array_equal(values, hounsfield)
    bands = image[0, ::8]
    assert bands[0] == bands[1] == bands[2] == 0.0 and bands[4] == 1.0  # the brain window saturates the rest
    rng = np.random.default_rng(0)
    lung_resolved = 0
    for _ in range(40):
        shifted = shift_image(image, ["windows"], rng, values)[0, ::8]
        assert np.all(np.diff(shifted) >= 0), "a window keeps the order of the CT values"
        lung_resolved += 0.0 < shifted[1] < shifted[3]
    assert lung_resolved > 0, "air, lung and fat share one grey in the 8-bit image: only HU can separate them"
    from_8bit = shift_image(image, ["windows"], np.random.default_rng(0))[0, ::8]
    assert from_8bit[0] == from_8bit[1] == from_8bit[2]


def test_only_grey_ct_files_carry_hounsfield_units(tmp_path: Path) -> None:
    for fields in ({"Modality": "CR"}, {"PhotometricInterpretation": "MONOCHROME1"}, {"RescaleType": "US"}):
        uri, _ = _ct_phantom(tmp_path, **fields)
        image, values = read_query_image(uri)
        assert values is None and image.shape == (16, 40)
    with pytest.raises(InvalidInputError, match="do not match the image"):
        shift_image(np.zeros((4, 4), np.float32), ["windows"], np.random.default_rng(0), np.zeros((4, 5)))


def test_cross_validation_describes_shifted_queries_with_the_archive_statistics(
    unifesp_subset: tuple[Path, Path],
) -> None:
    """BoVW's IDF is fitted on the archive; a shifted query must be weighted by it, not by statistics refitted on
    the shifted images (which would describe queries and archive in different spaces)."""
    from cbmir.evaluation.cross_validation import cross_validate
    from cbmir.extractors import create_extractor
    from cbmir.index_build import open_archive
    from cbmir.training.dataset import decode_archive

    data = decode_archive(open_archive(*unifesp_subset), progress=False)
    shifts = ("noise", "resize")
    doc = cross_validate(
        data,
        label_field="label",
        relevance=["label"],
        methods=["bovw"],
        group_field="patient_id",
        folds=2,
        device="cpu",
        progress=False,
        keep_rankings=True,
        shifts=shifts,
    )
    bovw = create_extractor("bovw", device="cpu")
    bovw.fit([data.images[i] for i in np.random.default_rng(0).choice(len(data), len(data), replace=False)])
    raw = bovw.extract(data.images)
    bovw.fit_archive(raw)
    archive = bovw.transform(raw)
    rng = np.random.default_rng(0)
    queries = bovw.transform(bovw.extract([shift_image(image, shifts, rng) for image in data.images]))
    similarity = queries @ archive.T
    patients = np.asarray(data.column("patient_id"))
    similarity[patients[:, None] == patients[None, :]] = -np.inf
    np.testing.assert_array_equal(doc["shifted_rankings"]["bovw"][:, 0], similarity.argmax(axis=1))


def test_cross_validation_re_exports_ct_dicom_from_its_hounsfield_units(tmp_path: Path) -> None:
    from cbmir.evaluation.site_shift import reexport_images
    from cbmir.index_build import open_archive
    from cbmir.training.dataset import decode_archive

    _, hounsfield = _ct_phantom(tmp_path)
    (tmp_path / "a-xray.png").write_bytes(real_png(0))  # described first: its draws precede the CT's
    data = decode_archive(open_archive(tmp_path, windows=dicom_windows({"CT": (40, 80)})), progress=False)
    assert data.ids == ["a-xray.png", "ct.dcm"] and len(data.uris) == 2
    ct = data.ids.index("ct.dcm")
    rng = np.random.default_rng(5)
    expected = [shift_image(im, ["windows"], rng, hounsfield if i == ct else None) for i, im in enumerate(data.images)]
    shifted = reexport_images(data.images, data.uris, ["windows"], seed=5)
    for got, want in zip(shifted, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    from_8bit = reexport_images(data.images, [], ["windows"], seed=5)
    np.testing.assert_array_equal(from_8bit[1 - ct], shifted[1 - ct])  # the PNG takes the same 8-bit change
    assert len(np.unique(from_8bit[ct][0, :24])) == 1  # air, lung and fat: one grey without the HU
    assert len(np.unique(shifted[ct][0, :24])) > 1
