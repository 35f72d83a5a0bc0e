"""Inference runtimes of the cnn extractor: the same descriptors as torch, converted once, clear refusals."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbmir.client import RetrievalClient
from cbmir.errors import InvalidInputError
from cbmir.extractors import create_extractor
from cbmir.extractors.imaging import decode_image
from cbmir.index_build import build_bundle, load_bundle, open_archive
from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server
from tests.helpers import UNIFESP, require

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def radiographs() -> list[np.ndarray]:
    """456 decoded single-label UNIFESP radiographs: 200 to describe, the rest to calibrate int8."""
    root = require(UNIFESP)
    with open(root / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["single_label"] == "1"][:456]
    return [decode_image((root / r["path"]).read_bytes()) for r in rows]


def _top10(descriptors: np.ndarray) -> np.ndarray:
    d = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True)
    dist = ((d[:, None, :] - d[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    return np.argsort(dist, axis=1, kind="stable")[:, :10]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(_top10(a), _top10(b))]))


@pytest.mark.parametrize(
    ("runtime", "precision", "max_abs", "min_agreement"),
    [
        ("openvino", "fp32", 1e-4, 1.0),
        ("onnxruntime", "fp32", 1e-4, 1.0),
        ("openvino", "bf16", None, 0.88),  # measured 0.92 at 128 px
        ("torch", "bf16", None, 0.88),  # measured 0.93
        ("openvino", "int8", None, 0.75),  # measured 0.81: EfficientNet-Lite loses most under post-training int8
    ],
)
def test_runtime_descriptors_match_torch_fp32(
    radiographs: list[np.ndarray], runtime: str, precision: str, max_abs: float | None, min_agreement: float
) -> None:
    queries, calibration = radiographs[:200], radiographs[200:]
    reference = create_extractor("cnn", image_size=128, runtime="torch", device="cpu").extract(queries)
    extractor = create_extractor("cnn", image_size=128, runtime=runtime, precision=precision, device="cpu")
    assert extractor.needs_fit == (precision == "int8")
    if extractor.needs_fit:
        extractor.fit(calibration)
    described = extractor.extract(queries)
    assert described.shape == reference.shape and described.dtype == np.float32
    if max_abs is not None:
        assert np.abs(described - reference).max() <= max_abs
    assert _agreement(described, reference) >= min_agreement


def test_converted_model_is_cached_by_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBMIR_CACHE_DIR", str(tmp_path))
    images = [np.random.default_rng(0).random((70, 90), dtype=np.float32)] * 3
    first = create_extractor("cnn", model="test_efficientnet", weights="random", image_size=32, runtime="openvino")
    first.extract(images)
    models = sorted((tmp_path / "models").iterdir())
    assert len(models) == 1 and (models[0] / "model.xml").is_file()
    written = (models[0] / "model.bin").stat().st_mtime_ns
    again = create_extractor("cnn", model="test_efficientnet", weights="random", image_size=32, runtime="openvino")
    again.load_state(first.state())
    np.testing.assert_array_equal(again.extract(images), first.extract(images))
    assert sorted((tmp_path / "models").iterdir()) == models
    assert (models[0] / "model.bin").stat().st_mtime_ns == written
    other = create_extractor("cnn", model="test_efficientnet", weights="random", image_size=32, runtime="openvino")
    other.extract(images)  # other random weights: another model
    assert len(list((tmp_path / "models").iterdir())) == 2


@pytest.mark.parametrize(
    ("runtime", "precision", "message"),
    [
        ("torch", "int8", "--runtime openvino"),
        ("onnxruntime", "bf16", "--runtime torch or openvino"),
        ("tensorrt", "fp32", "choose from auto, torch, openvino, onnxruntime"),
        ("openvino", "fp8", "choose from fp32, bf16, int8"),
    ],
)
def test_unusable_runtime_and_precision_are_refused(runtime: str, precision: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        create_extractor("cnn", model="test_efficientnet", weights="random", runtime=runtime, precision=precision)


def test_cli_refuses_int8_on_torch_in_one_line(unifesp_subset: tuple[Path, Path], tmp_path: Path) -> None:
    root, labels = unifesp_subset
    out = subprocess.run(
        [sys.executable, "-m", "cbmir.cli", "build", "--images", str(root), "--labels", str(labels)]
        + ["--out", str(tmp_path / "b"), "--extractors", "cnn", "--runtime", "torch", "--precision", "int8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "int8" in lines[0] and "--runtime openvino" in lines[0]
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def int8_bundle(unifesp_subset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 radiographs indexed by an OpenVINO int8 cnn (calibrated on the build's sample) and an fp32 torch one."""
    root, labels = unifesp_subset
    out = tmp_path_factory.mktemp("runtimes") / "b"
    build_bundle(
        open_archive(root, labels),
        out,
        {
            "cnn": {"image_size": 96, "runtime": "openvino", "precision": "int8"},
            "cnn_torch": {"extractor": "cnn", "image_size": 96, "runtime": "torch"},
        },
        device="cpu",
        progress=False,
    )
    return out


def test_manifest_records_runtime_and_server_uses_it(int8_bundle: Path) -> None:
    bundle = load_bundle(int8_bundle)
    assert bundle.methods["cnn"].config["runtime"] == "openvino"
    assert bundle.methods["cnn"].config["precision"] == "int8"
    assert "int8_onnx" in bundle.methods["cnn"].state
    assert set(bundle.manifest["build"]["runtimes"]) >= {"torch", "openvino", "onnxruntime"}
    restored = bundle.methods["cnn"].restore_extractor("cpu")
    assert (restored.config()["runtime"], restored.config()["precision"]) == ("openvino", "int8")


@pytest.mark.parametrize("runtime", ["bundle", "torch", "openvino", "onnxruntime"])
def test_server_with_each_runtime_answers(int8_bundle: Path, unifesp_subset: tuple[Path, Path], runtime: str) -> None:
    """Every runtime serves the bundle (the int8 method at fp32 where int8 is not supported) and finds the query
    image itself first."""
    root, labels = unifesp_subset
    with open(labels, newline="") as fh:
        first = next(csv.DictReader(fh))
    running = start_server(
        ServerConfig(
            index=str(int8_bundle),
            port=0,
            device="cpu",
            runtime=runtime,
            precision=None if runtime in ("bundle", "openvino") else "fp32",  # torch and onnxruntime cannot run int8
            default_method="cnn_torch",
        ),
        wait_ready=True,
    )
    try:
        with RetrievalClient(f"127.0.0.1:{running.port}") as client:
            hits = client.search_image((root / first["path"]).read_bytes(), k=3, method="cnn_torch")
            assert hits[0].id == first["path"] and hits[0].distance < 1e-3
            int8_hits = client.search_image((root / first["path"]).read_bytes(), k=3, method="cnn")
            assert int8_hits[0].id == first["path"]
    finally:
        running.stop(grace=None)


def test_serving_an_int8_bundle_on_onnxruntime_fails_at_start_up(int8_bundle: Path) -> None:
    config = ServerConfig(index=str(int8_bundle), port=0, device="cpu", runtime="onnxruntime")
    with pytest.raises(InvalidInputError, match="onnxruntime cannot run int8; use --runtime openvino"):
        start_server(config, wait_ready=True)
