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


def test_build_refuses_site_whitening_without_a_width(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", "--images", str(tmp_path), "--out", str(tmp_path / "b"), "--site-whiten"])
    assert code != 0
    assert "--site-whiten projects to --pca-dim dims: add --pca-dim" in capsys.readouterr().err
