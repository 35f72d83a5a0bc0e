import numpy as np
import pytest
import torch

from cbmir.errors import InvalidInputError
from cbmir.extractors import create_extractor, list_extractors
from cbmir.extractors.cnn import CNNExtractor, offline_weights_path


def test_registry_lists_builtins_and_rejects_unknown():
    assert {"cnn", "hog", "bovw"} <= set(list_extractors())
    with pytest.raises(InvalidInputError, match="choose from"):
        create_extractor("sift3d")
    with pytest.raises(InvalidInputError, match="bad configuration"):
        create_extractor("hog", colour=True)


def test_offline_imagenet_weights_map_in_order_onto_timm():
    ex = create_extractor("cnn", image_size=64, device="cpu")
    source = torch.load(offline_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(ex.net.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(ex.net.bn2.running_var, source["_bn1.running_var"])
    assert ex.dim == 1280 and ex.config()["weights_sha256"]


def test_descriptors_are_unit_length_batched_and_deterministic():
    rng = np.random.default_rng(0)
    images = [rng.random((50 + 10 * i, 60), dtype=np.float32) for i in range(5)]
    ex = create_extractor(
        "cnn", model="test_efficientnet", weights="random", image_size=48, device="cpu", forward_batch=2
    )
    batched = ex.describe(images)
    single = np.concatenate([ex.describe([im]) for im in images])
    assert batched.shape == (5, ex.dim)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_weights_file_and_restore_round_trip(tmp_path):
    ex = create_extractor("cnn", model="test_efficientnet", weights="random", image_size=48, device="cpu")
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ex.net.state_dict().items()}}, path)
    loaded = create_extractor("cnn", model="test_efficientnet", weights=str(path), image_size=48, device="cpu")
    image = [np.random.default_rng(3).random((64, 64), dtype=np.float32)]
    np.testing.assert_array_equal(loaded.describe(image), ex.describe(image))
    restored = CNNExtractor.restore(loaded.config(), loaded.state(), device="cpu")
    np.testing.assert_array_equal(restored.describe(image), ex.describe(image))
    with pytest.raises(InvalidInputError, match="do not fit"):
        create_extractor("cnn", model="test_resnet", weights=str(path), device="cpu")
    with pytest.raises(InvalidInputError, match="does not exist"):
        create_extractor("cnn", weights=str(tmp_path / "nope.pth"), device="cpu")


def test_pca_whitening_reduces_and_decorrelates():
    rng = np.random.default_rng(0)
    ex = create_extractor(
        "cnn", model="test_efficientnet", weights="random", pca_dim=8, whiten=True, l2_normalize=False, device="cpu"
    )
    raw = rng.standard_normal((200, ex.raw_dim)).astype(np.float32) @ rng.standard_normal(
        (ex.raw_dim, ex.raw_dim)
    ).astype(np.float32)
    ex.fit_archive(raw)
    out = ex.transform(raw)
    assert out.shape == (200, 8)
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(8), atol=0.05)
    restored = CNNExtractor.restore(ex.config(), ex.state(), device="cpu")
    np.testing.assert_allclose(restored.transform(raw), out, atol=1e-4)


def test_extractor_protocol_construction_reads_no_files_and_restore_ignores_the_weights_file(tmp_path):
    missing = str(tmp_path / "gone.pth")
    ex = CNNExtractor(model="test_efficientnet", weights=missing, image_size=48, device="cpu")  # no I/O here
    assert ex.device == torch.device("cpu") and not ex.can_classify and ex.classes is None
    with pytest.raises(InvalidInputError, match="does not exist"):
        ex.load_pretrained()
    trained = create_extractor("cnn", model="test_efficientnet", weights="random", image_size=48, device="cpu")
    restored = CNNExtractor.restore({**trained.config(), "weights": missing}, trained.state(), device="cpu")
    image = [np.random.default_rng(5).random((48, 48), dtype=np.float32)]
    np.testing.assert_array_equal(restored.describe(image), trained.describe(image))
    hog = create_extractor("hog", device="cpu")
    assert hog.device == torch.device("cpu") and not hog.can_classify
    with pytest.raises(InvalidInputError, match="no classification head"):
        hog.class_probabilities(np.zeros((1, hog.dim), np.float32))
