import json

import numpy as np
import pytest

from cbmir.cli import main
from cbmir.errors import InvalidInputError
from cbmir.extractors.hog import HOGExtractor
from cbmir.extractors.imaging import resize_batch
from cbmir.extractors.intensity import normalise_intensity, smooth_batch
from cbmir.index_build import load_bundle, open_archive
from cbmir.index_build.archive import read_archived_image


@pytest.fixture(scope="module")
def radiographs(unifesp_subset):
    root, labels = unifesp_subset
    archive = open_archive(root, labels)
    return resize_batch([read_archived_image(e.uri) for e in archive.entries[::15]], 256)


def re_exported(batch: np.ndarray) -> np.ndarray:
    """Another site's export: gamma 1.6 and a narrower contrast range, no clipping."""
    return 0.15 + 0.7 * batch**1.6


def test_equalize_undoes_monotone_intensity_changes_and_stretch_undoes_linear_ones(radiographs):
    shifted = re_exported(radiographs)
    assert np.abs(shifted - radiographs).mean() > 0.1
    equalised = normalise_intensity(radiographs, "equalize")
    assert np.abs(normalise_intensity(shifted, "equalize") - equalised).mean() < 0.02  # 8-bit levels merge
    assert equalised.min() == 0.0 and equalised.max() == 1.0
    linear = 0.2 + 0.5 * radiographs
    np.testing.assert_allclose(
        normalise_intensity(linear, "stretch"), normalise_intensity(radiographs, "stretch"), atol=2e-3
    )
    clahe = normalise_intensity(radiographs, "clahe")
    assert clahe.shape == radiographs.shape and clahe.dtype == np.float32 and 0.0 <= clahe.min() <= clahe.max() <= 1.0
    assert normalise_intensity(radiographs, "none") is radiographs
    with pytest.raises(InvalidInputError, match="intensity must be one of"):
        normalise_intensity(radiographs, "histogram")


def test_extractors_normalise_before_describing_and_restore_the_mode_from_their_config(radiographs):
    images = list(radiographs)  # 256 x 256: HOG's own size, so resizing changes nothing
    for mode in ("stretch", "equalize"):
        hog = HOGExtractor(intensity=mode, device="cpu")
        expected = HOGExtractor(device="cpu").describe(list(normalise_intensity(radiographs, mode)))
        np.testing.assert_allclose(hog.describe(images), expected, rtol=1e-5, atol=1e-6)
        restored = HOGExtractor.restore(hog.config(), {}, device="cpu")
        np.testing.assert_array_equal(restored.describe(images), hog.describe(images))
    assert not np.allclose(HOGExtractor(device="cpu").describe(images), expected)
    smoothed = HOGExtractor(intensity="stretch", smooth=1.5, device="cpu")
    expected = HOGExtractor(device="cpu").describe(list(smooth_batch(normalise_intensity(radiographs, "stretch"), 1.5)))
    np.testing.assert_allclose(smoothed.describe(images), expected, rtol=1e-5, atol=1e-6)
    assert HOGExtractor.restore(smoothed.config(), {}, device="cpu").smooth == 1.5
    with pytest.raises(InvalidInputError, match="smooth"):
        HOGExtractor(smooth=9.0)


def test_build_records_the_intensity_in_the_manifest(unifesp_subset, tmp_path):
    root, labels = unifesp_subset
    out = tmp_path / "eq"
    args = ["build", "--images", str(root), "--labels", str(labels), "--out", str(out), "--no-progress"]
    assert main([*args, "--extractors", "hog", "--intensity", "equalize"]) == 0
    bundle = load_bundle(out)
    assert bundle.methods["hog"].config["intensity"] == "equalize"
    manifest = json.loads(next(out.glob("v*/manifest.json")).read_text())
    assert manifest["methods"]["hog"]["config"]["intensity"] == "equalize"
