"""Dropping training images whose label their neighbours from other patients do not share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cbmir.training.label_noise as label_noise
from cbmir.errors import InvalidInputError
from cbmir.training import TrainConfig
from cbmir.training.label_noise import keep_consistent_labels, neighbour_label_share
from cbmir.training.trainer import train_extractor


def _clusters(rng: np.random.Generator, per_class: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(3 * per_class, 16) unit vectors in 3 tight clusters, and their class codes."""
    centres = np.eye(16, dtype=np.float32)[:3]
    labels = np.repeat(np.arange(3), per_class)
    x = centres[labels] + 0.05 * rng.standard_normal((len(labels), 16)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_a_mislabelled_image_has_no_neighbour_sharing_its_label() -> None:
    x, labels = _clusters(np.random.default_rng(0))
    labels[3] = 2  # a class-0 image filed under class 2
    groups = np.arange(len(labels))
    share = neighbour_label_share(x, labels, groups, k=5)
    assert share[3] == 0.0
    assert np.all(np.delete(share, 3) >= 0.8)
    keep = keep_consistent_labels(x, labels, groups, k=5, min_share=0.1)
    assert np.flatnonzero(~keep).tolist() == [3]


def test_a_patients_own_images_do_not_vouch_for_each_other() -> None:
    x, labels = _clusters(np.random.default_rng(1))
    x[1:4] = x[0] + 1e-4  # one patient's four near-identical class-0 images, all filed under class 1
    x[1:4] /= np.linalg.norm(x[1:4], axis=1, keepdims=True)
    labels[:4] = 1
    groups = np.arange(len(labels))
    groups[:4] = 100
    assert np.all(neighbour_label_share(x, labels, groups, k=5)[:4] == 0.0)
    groups[:4] = [100, 101, 102, 103]  # as four patients they agree with each other: 3 of 5 neighbours
    assert np.all(neighbour_label_share(x, labels, groups, k=5)[:4] == pytest.approx(0.6))


def test_a_class_is_never_emptied_and_a_lone_group_is_kept() -> None:
    x, labels = _clusters(np.random.default_rng(2))
    labels[5] = 7  # the only image of class 7: no neighbour can share its label
    keep = keep_consistent_labels(x, labels, np.arange(len(labels)), k=5, min_share=0.5)
    assert keep[5]
    assert neighbour_label_share(x, labels, np.zeros(len(labels), np.int64), k=5).tolist() == [1.0] * len(labels)


def test_chunked_similarities_give_the_same_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    x, labels = _clusters(np.random.default_rng(3), per_class=20)
    labels[::7] = (labels[::7] + 1) % 3
    groups = np.arange(len(labels)) // 2
    whole = neighbour_label_share(x, labels, groups, k=7)
    monkeypatch.setattr(label_noise, "SIMILARITY_BUDGET", 5 * len(labels))
    np.testing.assert_array_equal(neighbour_label_share(x, labels, groups, k=7), whole)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"label_filter": 1.5}, "share in"),
        ({"label_filter": -0.1}, "share in"),
        ({"label_filter": 0.1, "label_filter_k": 0}, "at least 1"),
        ({"label_filter": 0.1, "self_supervised": True}, "self-supervised"),
    ],
)
def test_filter_settings_that_cannot_work_are_refused_before_any_image_is_read(
    settings: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cbmir.cli import main

    with pytest.raises(InvalidInputError, match=message):
        TrainConfig(**settings)
    argv = ["train", "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt")]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "missing" not in err[0]


def test_fine_tuning_drops_radiographs_filed_under_another_body_part(unifesp_subset: tuple[Path, Path]) -> None:
    from cbmir.index_build import open_archive
    from cbmir.training.dataset import decode_archive

    data = decode_archive(open_archive(*unifesp_subset), progress=False)
    labels = data.column("label")
    noisy = list(labels)
    noisy[labels.index("Chest")] = "Knee"
    noisy[labels.index("Knee")] = "Abdomen"
    config = TrainConfig(image_size=64, epochs=1, batch_size=16, val_fraction=0.0, device="cpu", label_filter=0.1)
    result = train_extractor(data.images, noisy, data.column("patient_id"), config, progress=False, max_steps=1)
    assert result.training["label_filter_dropped"] == {"Abdomen": 1, "Knee": 1}
    assert result.training["train_images"] == len(labels) - 2
    clean = train_extractor(data.images, labels, data.column("patient_id"), config, progress=False, max_steps=1)
    assert clean.training["label_filter_dropped"] == {}


def test_a_fold_model_saved_before_the_filter_existed_counts_as_unfiltered() -> None:
    from dataclasses import asdict

    from cbmir.evaluation.cross_validation import _without_weights_path

    identity = {"fold": 0, "config": asdict(TrainConfig(weights="a.pt"))}
    older = {"fold": 0, "config": {k: v for k, v in identity["config"].items() if not k.startswith("label_filter")}}
    assert _without_weights_path(older) == _without_weights_path(identity)
    filtered = {"fold": 0, "config": asdict(TrainConfig(weights="b.pt", label_filter=0.1))}
    assert _without_weights_path(older) != _without_weights_path(filtered)
