"""Label-free training: site-shifted views, a few real contrastive steps, a headless checkpoint that indexes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cbmir.cli import main
from cbmir.extractors import create_extractor
from cbmir.index_build import load_bundle
from cbmir.training import TrainConfig
from cbmir.training.reexport import SHIFTS, random_reexport
from cbmir.training.self_supervised import own_view_top1, train_self_supervised
from cbmir.training.trainer import save_checkpoint


def test_random_reexport_draws_changes_per_image_reproducibly() -> None:
    images = np.random.default_rng(0).random((6, 40, 40), dtype=np.float32)
    untouched = random_reexport(images, np.random.default_rng(1), p=0.0)
    np.testing.assert_array_equal(untouched, images)
    a = random_reexport(images, np.random.default_rng(1), p=1.0)
    b = random_reexport(images, np.random.default_rng(1), p=1.0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == images.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert all(not np.allclose(a[i], images[i], atol=0.01) for i in range(len(images)))
    assert not np.array_equal(a[0], a[1] - images[1] + images[0]), "each image draws its own parameters"
    half = random_reexport(images, np.random.default_rng(2), p=0.5)
    assert len(SHIFTS) == 5 and 0 < sum(not np.array_equal(h, x) for h, x in zip(half, images, strict=True)) <= 6


@pytest.fixture(scope="module")
def self_trained(unifesp_subset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """Lite0 trained without labels for a few steps on 90 real radiographs, and its checkpoint."""
    from cbmir.index_build import open_archive
    from cbmir.training.dataset import decode_archive

    data = decode_archive(open_archive(*unifesp_subset), progress=False)
    config = TrainConfig(
        self_supervised=True, image_size=64, epochs=3, batch_size=16, lr=3e-4, val_fraction=0.2, device="cpu"
    )
    result = train_self_supervised(data.images, data.column("patient_id"), config, progress=False)
    ckpt = save_checkpoint(result, tmp_path_factory.mktemp("ssl") / "ssl.pt")
    return data, result, ckpt


def test_self_supervised_loss_falls_and_no_label_is_kept(self_trained) -> None:
    _, result, _ = self_trained
    epochs = [row for row in result.history if row["epoch"] > 0]
    assert len(epochs) == 3 and epochs[-1]["loss"] < epochs[0]["loss"]
    assert all(0.0 <= row["val_own_view_top1"] <= 1.0 for row in result.history)
    assert result.classes == [] and result.extractor.head is None and not result.extractor.can_classify
    assert "patient positives" in result.training["objective"] and result.training["best_val_mAP"] is None


def test_self_supervised_checkpoint_moves_the_backbone_and_loads_back(self_trained) -> None:
    data, result, ckpt = self_trained
    payload = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert "head" not in payload and payload["classes"] == []
    imagenet = create_extractor("cnn", image_size=64, device="cpu")
    loaded = create_extractor("cnn", weights=str(ckpt), image_size=64, device="cpu")
    images = data.images[:8]
    np.testing.assert_allclose(loaded.describe(images), result.extractor.describe(images), atol=1e-6)
    assert not np.allclose(loaded.describe(images), imagenet.describe(images), atol=1e-3)
    assert loaded.classes is None and loaded.training["self_supervised"] is True


def test_own_view_diagnostic_finds_identical_images() -> None:
    extractor = create_extractor("cnn", model="test_efficientnet", weights="random", image_size=32, device="cpu")
    extractor.load_pretrained()
    distinct = torch.from_numpy(np.random.default_rng(0).random((6, 32, 32), dtype=np.float32))
    reexported = torch.from_numpy(random_reexport(distinct.numpy(), np.random.default_rng(0), p=1.0))
    assert 0.0 <= own_view_top1(extractor, distinct, reexported) <= 1.0
    assert own_view_top1(extractor, distinct, distinct.clone()) == 1.0
    assert np.isnan(own_view_top1(extractor, distinct[:1], reexported[:1]))


def test_cli_trains_on_an_archive_without_labels_and_builds_with_it(tmp_path: Path) -> None:
    archive = tmp_path / "unlabelled"
    archive.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        cv2.imwrite(str(archive / f"{i:02d}.png"), (rng.random((48, 48)) * 255).astype(np.uint8))
    ckpt = tmp_path / "ssl.pt"
    common = ["--model", "test_efficientnet", "--image-size", "32", "--no-progress"]
    rc = main(
        ["train", "--self-supervised", "--images", str(archive), "--weights", "random", "--epochs", "1"]
        + ["--batch-size", "4", "--freeze-blocks", "0", "--max-images", "10", "--out", str(ckpt), *common]
    )
    assert rc == 0 and ckpt.is_file()
    training = torch.load(ckpt, map_location="cpu", weights_only=False)["training"]
    assert training["train_images"] + training["val_images"] == 10 and training["label_field"] is None
    bundle = tmp_path / "bundle"
    rc = main(["build", "--images", str(archive), "--extractors", "cnn", "--weights", str(ckpt), "--out", str(bundle)])
    assert rc != 0, "build without --model test_efficientnet must refuse a checkpoint of another backbone"
    rc = main(
        ["build", "--images", str(archive), "--extractors", "cnn", "--weights", str(ckpt), "--out", str(bundle)]
        + common
    )
    assert rc == 0
    config = load_bundle(bundle).manifest["methods"]["cnn"]["config"]
    assert config["training"]["self_supervised"] is True and not config["classes"]


def test_loading_with_another_intensity_than_training_warns(self_trained, caplog: pytest.LogCaptureFixture) -> None:
    _, _, ckpt = self_trained
    with caplog.at_level("WARNING", logger="cbmir.extractors"):
        create_extractor("cnn", weights=str(ckpt), image_size=64, intensity="clahe", device="cpu")
    assert "trained with intensity 'none'" in caplog.text and "--intensity none" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cbmir.extractors"):
        create_extractor("cnn", weights=str(ckpt), image_size=64, device="cpu")
    assert "trained with intensity" not in caplog.text
