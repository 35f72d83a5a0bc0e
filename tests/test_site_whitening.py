"""Learned whitening from site-shift pairs: re-exports of one image land together, whatever PCA would keep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cbmir.cli import main
from cbmir.errors import InvalidInputError
from cbmir.extractors import create_extractor
from cbmir.extractors.cnn import CNNExtractor
from cbmir.extractors.site_whitening import fit_site_whitening
from cbmir.index_build.bundle import read_manifest, resolve_version_dir


def _exports(n: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descriptors of n images whose content spans 8 directions and whose export adds a random offset, three times
    larger, in 8 other directions: (content mixing (8, width), nuisance mixing (8, width), content (n, 8))."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((8, width)), 3.0 * rng.standard_normal((8, width)), rng.standard_normal((n, 8))


def _export(content: np.ndarray, mix: np.ndarray, nuisance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return content @ mix + rng.standard_normal((len(content), 8)) @ nuisance


def _self_retrieval(gallery: np.ndarray, queries: np.ndarray) -> float:
    d = ((queries[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    return float((d.argmin(axis=1) == np.arange(len(queries))).mean())


def test_whitening_from_pairs_finds_the_same_image_from_another_export_where_pca_fails() -> None:
    mix, nuisance, content = _exports(400, 64, seed=0)
    rng = np.random.default_rng(1)
    archive = _export(content, mix, nuisance, rng)
    mean, matrix = fit_site_whitening(archive, [_export(content, mix, nuisance, rng) for _ in range(2)], dim=8)
    assert mean.shape == (64,) and matrix.shape == (64, 8) and matrix.dtype == np.float32
    queries = _export(content, mix, nuisance, rng)
    pca = np.linalg.svd(archive - archive.mean(0), full_matrices=False)[2][:8].T
    plain = _self_retrieval((archive - archive.mean(0)) @ pca, (queries - archive.mean(0)) @ pca)
    learned = _self_retrieval((archive - mean) @ matrix, (queries - mean) @ matrix)
    assert plain < 0.3 and learned > 0.9, (plain, learned)


def test_site_whitening_refuses_what_it_cannot_fit() -> None:
    raw = np.zeros((10, 32), np.float32)
    with pytest.raises(InvalidInputError, match="lower --pca-dim or raise --fit-sample"):
        fit_site_whitening(raw, [raw], dim=16)
    with pytest.raises(InvalidInputError, match="shaped like"):
        fit_site_whitening(np.ones((40, 32)), [np.ones((39, 32))], dim=4)
    with pytest.raises(InvalidInputError, match="set pca_dim"):
        create_extractor("cnn", model="test_efficientnet", weights="random", site_whiten=True, device="cpu")


def test_a_site_whitened_cnn_fits_on_its_sample_and_restores_without_refitting() -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((48, 48), dtype=np.float32) for _ in range(40)]
    ex = create_extractor(
        "cnn", model="test_efficientnet", weights="random", image_size=48, pca_dim=4, site_whiten=True, device="cpu"
    )
    assert ex.needs_fit
    ex.fit(images)
    assert not ex.needs_fit
    learned = ex.describe(images[:5])
    ex.fit_archive(ex.extract(images[:20]))
    out = ex.describe(images[:5])
    np.testing.assert_array_equal(out, learned)  # the archive's PCA does not replace the learned projection
    assert out.shape == (5, 4) and ex.config()["site_whiten"] is True
    restored = CNNExtractor.restore(ex.config(), ex.state(), device="cpu")
    assert not restored.needs_fit
    np.testing.assert_allclose(restored.describe(images[:5]), out, atol=1e-5)


def test_auto_site_whitening_learns_the_projection_from_a_large_enough_sample_and_keeps_the_width_below() -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((48, 48), dtype=np.float32) for _ in range(16)]
    config = {"model": "test_efficientnet", "weights": "random", "image_size": 48, "device": "cpu"}
    small = create_extractor("cnn", pca_dim=4, site_whiten="auto", **config)
    assert small.needs_fit
    small.fit(images[:15])
    assert small.config()["site_whiten"] is False and small.config()["pca_dim"] == 0
    assert small.describe(images[:2]).shape == (2, small.raw_dim)
    enough = create_extractor("cnn", pca_dim=4, site_whiten="auto", **config)
    enough.fit(images)
    assert enough.config()["site_whiten"] is True and enough.describe(images[:2]).shape == (2, 4)
    with pytest.raises(InvalidInputError, match="site_whiten must be"):
        create_extractor("cnn", pca_dim=4, site_whiten="yes", **config)


def _built_cnn(out: Path) -> dict[str, object]:
    manifest = read_manifest(resolve_version_dir(out))
    cnn = manifest["methods"]["cnn"]
    return {"dim": cnn["dim"], **{k: cnn["config"][k] for k in ("pca_dim", "whiten", "site_whiten")}}


def test_cbmir_build_site_whitens_by_default_when_the_archive_is_large_enough(
    unifesp_subset: tuple[Path, Path], tmp_path: Path
) -> None:
    root, labels = unifesp_subset
    build = ["build", "--images", str(root), "--labels", str(labels), "--extractors", "cnn", "--model"]
    build += ["test_efficientnet", "--weights", "random", "--image-size", "48", "--no-progress", "--out"]
    assert main([*build, str(tmp_path / "auto"), "--pca-dim", "8"]) == 0  # 90 images: >= 4 per dimension
    assert _built_cnn(tmp_path / "auto") == {"dim": 8, "pca_dim": 8, "whiten": False, "site_whiten": True}
    assert main([*build, str(tmp_path / "small")]) == 0  # 90 images are too few for the default 128 dims
    width = _built_cnn(tmp_path / "small")["dim"]
    assert _built_cnn(tmp_path / "small") == {"dim": width, "pca_dim": 0, "whiten": False, "site_whiten": False}
    assert main([*build, str(tmp_path / "pca"), "--projection", "pca", "--pca-dim", "8", "--whiten"]) == 0
    assert _built_cnn(tmp_path / "pca") == {"dim": 8, "pca_dim": 8, "whiten": True, "site_whiten": False}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--site-whiten"], "site whitening to 128 dims needs more sample images"),
        (["--whiten"], "--whiten scales PCA components: add --projection pca"),
        (["--site-whiten", "--projection", "pca"], "--site-whiten contradicts --projection pca"),
        (["--projection", "none", "--pca-dim", "64"], "--pca-dim sets the width of a projection"),
        (["--pca-dim", "0"], "--pca-dim must be at least 1"),
    ],
)
def test_build_refuses_contradictory_projection_flags(
    flags: list[str],
    message: str,
    unifesp_subset: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, labels = unifesp_subset
    build = ["build", "--images", str(root), "--labels", str(labels), "--extractors", "cnn", "--model"]
    build += ["test_efficientnet", "--weights", "random", "--image-size", "48", "--no-progress", "--out"]
    assert main([*build, str(tmp_path / "b"), *flags]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
