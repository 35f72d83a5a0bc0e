"""Shared fixtures: a labelled UNIFESP subset and a small real bundle, each built once per session."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.helpers import UNIFESP, require


@pytest.fixture(scope="session")
def unifesp_subset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A labels CSV selecting 90 single-label UNIFESP radiographs of 3 body parts, several per patient."""
    root = require(UNIFESP)
    with open(root / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["single_label"] == "1"]
    picked: list[dict[str, str]] = []
    for label in ("Chest", "Knee", "Abdomen"):
        picked += [r for r in rows if r["label"] == label][:30]
    out = tmp_path_factory.mktemp("unifesp") / "labels.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(picked[0]))
        writer.writeheader()
        writer.writerows(picked)
    return root, out


@pytest.fixture(scope="session")
def small_bundle(unifesp_subset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of 90 real radiographs with cnn (offline ImageNet EfficientNet-Lite0), hog and bovw."""
    from cbmir.index_build import build_bundle, open_archive

    root, labels = unifesp_subset
    out = tmp_path_factory.mktemp("bundles") / "small"
    build_bundle(
        open_archive(root, labels),
        out,
        {"cnn": {"image_size": 96}, "hog": {}, "bovw": {"words": 64, "kmeans_iters": 10}},
        batch_size=32,
        device="cpu",
        progress=False,
    )
    return out


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted models (OpenVINO, ONNX) go to a fresh cache per test session, not the user's ~/.cache/cbmir."""
    import os

    path = tmp_path_factory.mktemp("model-cache")
    os.environ["CBMIR_CACHE_DIR"] = str(path)
    return path
