"""Fine-tuning: splits, loss, a few real training steps, checkpoint round trip, and the learned variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cbmir.errors import InvalidInputError
from cbmir.evaluation.metrics import seed_map
from cbmir.extractors import create_extractor
from cbmir.training import TrainConfig
from cbmir.training.dataset import balanced_subsample
from cbmir.training.losses import supervised_contrastive_loss
from cbmir.training.splits import group_kfold, group_split
from cbmir.training.trainer import save_checkpoint, train_extractor


def test_group_kfold_keeps_groups_whole_and_balances_folds() -> None:
    rng = np.random.default_rng(0)
    groups = [f"p{g}" for g in rng.integers(0, 40, 300)] + [""] * 20
    folds = group_kfold(groups, 5, seed=1)
    arr = np.asarray(groups)
    for g in set(groups) - {""}:
        assert len(set(folds[arr == g])) == 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.sum() == 320 and sizes.max() - sizes.min() <= max(np.unique(arr[arr != ""], return_counts=True)[1])
    with pytest.raises(InvalidInputError):
        group_kfold(["a", "b"], 3)


def test_group_split_never_shares_a_group() -> None:
    groups = [f"p{i // 4}" for i in range(200)]
    train, val = group_split(groups, 0.2, seed=3)
    assert len(train) + len(val) == 200 and 30 <= len(val) <= 60
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    assert len(group_split(groups, 0.0)[1]) == 0


def test_balanced_subsample_spreads_over_classes() -> None:
    labels = ["a"] * 100 + ["b"] * 10 + ["c"] * 50
    keep = balanced_subsample(labels, 60, seed=0)
    picked = np.asarray(labels)[keep]
    assert len(keep) == 60 and (picked == "b").sum() == 10 and abs((picked == "a").sum() - (picked == "c").sum()) <= 1


def test_supcon_rewards_clustered_embeddings() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    centres = torch.eye(3)[labels]
    clustered = torch.nn.functional.normalize(centres + 0.05 * torch.randn(6, 3), dim=1)
    mixed = torch.nn.functional.normalize(torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])] + 0.05, dim=1)
    assert supervised_contrastive_loss(clustered, labels) < supervised_contrastive_loss(mixed, labels)
    lonely = supervised_contrastive_loss(clustered, torch.arange(6))
    assert float(lonely) == 0.0


@pytest.fixture(scope="module")
def trained(unifesp_subset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """Lite0 fine-tuned for a few steps on 90 real radiographs of 3 body parts, and its checkpoint."""
    from cbmir.index_build import open_archive
    from cbmir.training.dataset import decode_archive

    root, labels_csv = unifesp_subset
    data = decode_archive(open_archive(root, labels_csv), progress=False)
    config = TrainConfig(
        image_size=64, epochs=4, batch_size=16, lr=1e-3, val_fraction=0.2, patience=10, device="cpu", seed=0
    )
    result = train_extractor(data.images, data.column("label"), data.column("patient_id"), config, progress=False)
    result.training["label_field"] = "label"
    ckpt = save_checkpoint(result, tmp_path_factory.mktemp("ckpt") / "lite0.pt")
    return data, result, ckpt


def test_training_loss_falls_and_validation_is_patient_disjoint(trained) -> None:
    _, result, _ = trained
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 4
    assert losses[-1] < losses[0]
    assert result.training["val_images"] > 0 and "val_mAP" in result.history[0]
    assert result.classes == ["Abdomen", "Chest", "Knee"]


def test_checkpoint_round_trips_into_an_extractor(trained) -> None:
    data, result, ckpt = trained
    images = data.images[:12]
    loaded = create_extractor("cnn", weights=str(ckpt), image_size=64, device="cpu")
    np.testing.assert_allclose(loaded.describe(images), result.extractor.describe(images), rtol=0, atol=1e-6)
    assert loaded.classes == result.classes and loaded.training["best_epoch"] == result.best_epoch
    raw = loaded.extract(images)
    np.testing.assert_allclose(loaded.class_probabilities(raw), result.extractor.class_probabilities(raw), atol=1e-6)
    predicted = np.asarray(loaded.classes)[loaded.class_probabilities(loaded.extract(data.images)).argmax(1)]
    assert (predicted == np.asarray(data.column("label"))).mean() > 0.6


def test_projection_of_a_fine_tuned_extractor_is_replaced_without_touching_its_head(trained) -> None:
    data, _, ckpt = trained
    extractor = create_extractor("cnn", weights=str(ckpt), image_size=64, device="cpu")
    raw = extractor.extract(data.images)
    probabilities = extractor.class_probabilities(raw)
    with pytest.raises(InvalidInputError, match="pca_dim"):
        extractor.set_projection(0, site_whiten=True)
    extractor.set_projection(16, site_whiten=True)
    assert extractor.needs_fit
    with pytest.raises(RuntimeError, match="not fitted"):
        extractor.transform(raw)
    extractor.fit(data.images)
    projected = extractor.transform(raw)
    assert projected.shape == (len(data.images), 16)
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(extractor.class_probabilities(extractor.extract(data.images)), probabilities, atol=1e-6)
    extractor.set_projection(32, site_whiten="auto")
    extractor.fit(data.images)  # 90 images are too few for a 32-dim site whitening (4 images per dimension)
    assert extractor.transform(raw).shape == (len(data.images), extractor.raw_dim)


def test_new_projection_keeps_an_int8_calibration(trained) -> None:
    data, _, ckpt = trained
    extractor = create_extractor("cnn", weights=str(ckpt), image_size=64, device="cpu", precision="int8")
    assert extractor.needs_fit
    extractor.fit(data.images)
    calibrated = extractor._int8_model
    assert calibrated is not None and not extractor.needs_fit
    extractor.set_projection(16, site_whiten=True)
    assert extractor.needs_fit
    extractor.fit(data.images[:40])
    assert extractor._int8_model is calibrated and extractor.transform(extractor.extract(data.images)).shape[1] == 16
    extractor.set_projection(16, site_whiten=False)
    assert not extractor.needs_fit


@pytest.fixture(scope="module")
def finetuned_bundle(trained, unifesp_subset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cbmir.index_build import build_bundle, open_archive

    _, _, ckpt = trained
    out = tmp_path_factory.mktemp("ft") / "bundle"
    build_bundle(
        open_archive(*unifesp_subset),
        out,
        {"cnn": {"weights": str(ckpt), "image_size": 64}},
        device="cpu",
        progress=False,
    )
    return out


def test_checkpoint_bundle_records_training_and_restores_identically(trained, finetuned_bundle: Path) -> None:
    from cbmir.index_build import load_bundle
    from cbmir.server.search_engine import SearchEngine

    data, result, _ = trained
    bundle = load_bundle(finetuned_bundle)
    config = bundle.manifest["methods"]["cnn"]["config"]
    assert config["training"]["best_epoch"] == result.best_epoch and config["classes"] == result.classes
    restored = SearchEngine(bundle, device="cpu").extractor("cnn")
    np.testing.assert_allclose(
        restored.describe(data.images[:5]), result.extractor.describe(data.images[:5]), atol=1e-6
    )
    assert restored.can_classify


def _finetuned_engine(trained, finetuned_bundle: Path, n: int = 20):
    """The fine-tuned bundle's engine, its extractor, and the first n training images' descriptors and head
    probabilities."""
    from cbmir.index_build import load_bundle
    from cbmir.server.search_engine import SearchEngine

    data, _, _ = trained
    engine = SearchEngine(load_bundle(finetuned_bundle), device="cpu")
    extractor = engine.extractor("cnn")
    raw = extractor.extract(data.images[:n])
    return engine, extractor, extractor.transform(raw), extractor.class_probabilities(raw)


def test_class_predicted_search_stays_in_the_predicted_class(trained, finetuned_bundle: Path) -> None:
    engine, extractor, queries, probs = _finetuned_engine(trained, finetuned_bundle)
    bundle = engine.bundle
    result, predicted = engine.search_predicted_class("cnn", queries, probs, 10, min_confidence=0.0)
    labels = np.asarray(bundle.metadata["label"])
    assert (predicted >= 0).all()
    for i in range(20):
        assert set(labels[result.rows[i]]) == {extractor.classes[predicted[i]]}
    full = engine.search("cnn", queries, 10)
    fallback, none_routed = engine.search_predicted_class("cnn", queries, probs, 10, min_confidence=1.0)
    assert (none_routed[probs.max(1) < 1.0] == -1).all()
    unsure = probs.max(1) < 1.0
    np.testing.assert_array_equal(fallback.rows[unsure], full.rows[unsure])
    topped, _ = engine.search_predicted_class("cnn", queries[:3], probs[:3], 40, min_confidence=0.0)
    assert (topped.rows >= 0).all() and all(len(set(r)) == 40 for r in topped.rows)
    with pytest.raises(InvalidInputError):
        engine.search_predicted_class("cnn", queries, probs, 10, min_confidence=1.5)


def test_neighbour_vote_decides_between_equally_likely_classes(trained, finetuned_bundle: Path) -> None:
    from cbmir.index_build import load_bundle
    from cbmir.server.search_engine import SearchEngine

    data, _, _ = trained
    bundle = load_bundle(finetuned_bundle)
    engine = SearchEngine(bundle, device="cpu")
    extractor = engine.extractor("cnn")
    queries = extractor.transform(extractor.extract(data.images[:20]))
    classes = np.asarray(extractor.classes)
    flat = np.full((20, len(classes)), 1.0 / len(classes), np.float32)
    _, head_only = engine.search_predicted_class("cnn", queries, flat, 10, min_confidence=0.0)
    assert (head_only == 0).all()
    labels = np.asarray(bundle.metadata["label"])
    neighbours = labels[engine.search("cnn", queries, 5).rows]
    majority = [max(classes, key=lambda c: (row == c).sum()) for row in neighbours]
    result, voted = engine.search_predicted_class("cnn", queries, flat, 10, min_confidence=0.0, neighbour_vote=5)
    assert list(classes[voted]) == majority and set(majority) != {classes[0]}
    for i in range(20):
        assert set(labels[result.rows[i]]) == {majority[i]}
    with pytest.raises(InvalidInputError):
        engine.search_predicted_class("cnn", queries, flat, 10, neighbour_vote=-1)


def test_query_expansion_inside_the_predicted_class(trained, finetuned_bundle: Path) -> None:
    from cbmir.server.query_expansion import QueryExpansion

    engine, extractor, queries, probs = _finetuned_engine(trained, finetuned_bundle)
    bundle = engine.bundle
    exclude = [np.array([i]) for i in range(20)]
    expansion = QueryExpansion(2)
    result, predicted = engine.search_predicted_class(
        "cnn", queries, probs, 10, min_confidence=0.0, exclude=exclude, expansion=expansion, neighbour_vote=5
    )
    plain, _ = engine.search_predicted_class(
        "cnn", queries, probs, 10, min_confidence=0.0, exclude=exclude, neighbour_vote=5
    )
    labels = np.asarray(bundle.metadata["label"])
    assert not np.array_equal(result.rows, plain.rows)
    assert all(i not in result.rows[i] for i in range(20))
    for c in np.unique(predicted):
        sel = np.flatnonzero(predicted == c)
        in_class = engine.allowed_rows({"label": [extractor.classes[c]]})
        manual = engine.search(
            "cnn", queries[sel], 10, allowed=in_class, exclude=[exclude[i] for i in sel], expansion=expansion
        )
        np.testing.assert_array_equal(result.rows[sel], manual.rows)
        assert set(labels[result.rows[sel]].ravel()) == {extractor.classes[c]}


def test_multiscale_descriptor_concatenates_stage_features(trained) -> None:
    data, _, ckpt = trained
    ms = create_extractor("cnn", weights=str(ckpt), image_size=64, stages=(1, 2, 3, 4), device="cpu")
    assert ms.raw_dim == sum(ms.net.feature_info.channels()) and ms.raw_dim < 1280
    raw = ms.extract(data.images[:4])
    widths = np.cumsum([0, *ms.net.feature_info.channels()])
    for lo, hi in zip(widths[:-1], widths[1:]):
        np.testing.assert_allclose(np.linalg.norm(raw[:, lo:hi], axis=1), 1.0, atol=1e-5)
    ms_pca = create_extractor("cnn", weights=str(ckpt), image_size=64, stages=(2, 4), pca_dim=16, device="cpu")
    ms_pca.fit_archive(ms_pca.extract(data.images[:40]))
    assert ms_pca.describe(data.images[:3]).shape == (3, 16)


def test_cross_validation_queries_every_image_once_without_its_patient(unifesp_subset) -> None:
    from cbmir.evaluation.cross_validation import cross_validate
    from cbmir.index_build import open_archive
    from cbmir.training.dataset import decode_archive

    data = decode_archive(open_archive(*unifesp_subset), progress=False)
    doc = cross_validate(
        data,
        label_field="label",
        relevance=["label"],
        methods=["hog", "finetuned", "classpred", "classpred:vote5", "hashing", "multiscale"],
        group_field="patient_id",
        folds=2,
        train_config=TrainConfig(image_size=64, epochs=1, batch_size=16, device="cpu", val_fraction=0.2),
        hashing_bits=32,
        device="cpu",
        progress=False,
        keep_rankings=True,
        shifts=("resize", "noise"),
    )
    patients = np.asarray(data.column("patient_id"))
    for method, rows in [*doc["rankings"].items(), *doc["shifted_rankings"].items()]:
        assert (rows >= 0).all(), method
        assert not (patients[rows] == patients[:, None]).any(), method
    assert any((doc["shifted_rankings"][m] != doc["rankings"][m]).any() for m in doc["rankings"])
    unshifted_p1 = {r["method"]: r["mP@k"][0] for r in doc["results"]}
    for r in doc["site_shift"]["results"]:
        assert r["unshifted"]["P@1"] == unshifted_p1[r["method"]], r["method"]
        assert 0.0 <= r["shifted"]["P@1"] <= 1.0
    assert {r["method"] for r in doc["results"]} == {
        "hog",
        "finetuned",
        "classpred",
        "classpred:vote5",
        "hashing",
        "multiscale",
    }
    assert all(r["queries"] == len(data) for r in doc["results"])
    assert [f["queries"] for f in doc["folds"]] and sum(f["queries"] for f in doc["folds"]) == len(data)
    assert 0.0 <= doc["summary"]["classpred_routed_fraction"] <= 1.0
    timed = doc["summary"]["search_ms_per_query"]
    assert set(timed) == {r["method"] for r in doc["results"]} and all(v > 0 for v in timed.values())
    labels = np.asarray(data.column("label"))
    for r in doc["results"]:  # each figure is exactly the seed mAP of the rankings it reports
        rows = doc["rankings"][r["method"]]
        assert r["seed_mAP"] == round(seed_map(labels[rows] == labels[:, None]), 6), r["method"]


def test_cross_validation_reuses_fold_models_only_when_trained_alike(
    unifesp_subset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cbmir.evaluation.cross_validation import cross_validate
    from cbmir.index_build import open_archive
    from cbmir.training.dataset import decode_archive

    data = decode_archive(open_archive(*unifesp_subset), progress=False)
    models = tmp_path / "models"

    def run(config: TrainConfig) -> dict:
        return cross_validate(
            data,
            label_field="label",
            relevance=["label"],
            methods=["finetuned", "classpred", "multiscale"],
            group_field="patient_id",
            folds=2,
            train_config=config,
            device="cpu",
            progress=False,
            keep_rankings=True,
            fold_models=models,
        )

    config = TrainConfig(image_size=64, epochs=1, batch_size=16, device="cpu", val_fraction=0.2)
    first = run(config)
    saved = sorted(p.name for p in models.iterdir())
    assert saved == ["fold-0-of-2.pt", "fold-1-of-2.pt"]
    assert not any("reused" in f for f in first["folds"])
    stamps = {p: p.stat().st_mtime_ns for p in models.iterdir()}

    again = run(config)
    assert all(f["reused"].endswith(f"fold-{f['fold']}-of-2.pt") for f in again["folds"])
    assert [f["best_epoch"] for f in again["folds"]] == [f["best_epoch"] for f in first["folds"]]
    assert {p: p.stat().st_mtime_ns for p in models.iterdir()} == stamps
    for method, rows in first["rankings"].items():
        np.testing.assert_array_equal(again["rankings"][method], rows, err_msg=method)
    from cbmir.evaluation.report import cv_table
    from cbmir.evaluation.report import main as report

    for doc, note in ((first, False), (again, True)):
        written = tmp_path / "cv.json"
        written.write_text(json.dumps({k: v for k, v in doc.items() if k != "rankings"}))
        table = cv_table(written, ("label",))
        assert ("2 fold models reused" in table) is note
        rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
        assert "search ms/query" in rows["method"] and "search_ms_per_query" not in table
        for method, ms in doc["summary"]["search_ms_per_query"].items():
            assert rows[method].endswith(f"| {ms:.3f} |"), rows[method]
    report(["--results", str(tmp_path)])  # a CV result under a name the curated list lacks is still reported
    assert "## cv (group k-fold cross-validation" in capsys.readouterr().out

    changed = run(TrainConfig(**{**config.__dict__, "lr": 1e-3}))
    assert not any("reused" in f for f in changed["folds"])
    assert all(p.stat().st_mtime_ns != stamps[p] for p in models.iterdir())

    # start weights are known by content: the same file under another path reuses, other content trains again
    start = tmp_path / "start.pt"
    shutil.copyfile(models / "fold-0-of-2.pt", start)
    from_file = TrainConfig(**{**config.__dict__, "weights": str(start)})
    models = tmp_path / "from-file"
    assert not any("reused" in f for f in run(from_file)["folds"])
    moved = tmp_path / "elsewhere" / "start.pt"
    moved.parent.mkdir()
    shutil.copyfile(start, moved)
    assert all("reused" in f for f in run(TrainConfig(**{**config.__dict__, "weights": str(moved)}))["folds"])
    shutil.copyfile(models / "fold-1-of-2.pt", moved)
    assert not any("reused" in f for f in run(TrainConfig(**{**config.__dict__, "weights": str(moved)}))["folds"])


def test_server_answers_class_predicted_search(trained, finetuned_bundle: Path) -> None:
    import grpc

    from cbmir.client import build_request
    from cbmir.server.config import ServerConfig
    from cbmir.server.startup import start_server
    from cbmir.v1 import retrieval_pb2_grpc as pb_grpc

    data, _, _ = trained
    running = start_server(ServerConfig(index=str(finetuned_bundle), port=0, device="cpu"), wait_ready=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        stub = pb_grpc.RetrievalStub(channel)
        pixels = (data.images[0] * 255).astype(np.uint8)
        stream = stub.Search(
            build_request(pixels=pixels, k=10, predict_class=True, min_class_confidence=0.01), timeout=30
        )
        hits = list(stream)
        predicted = dict(stream.trailing_metadata())["cbmir-predicted-class"]
        assert predicted in ("Abdomen", "Chest", "Knee")
        assert len(hits) == 10 and {h.metadata["label"] for h in hits} == {predicted}
        from cbmir.client import RetrievalClient

        with RetrievalClient(f"127.0.0.1:{running.port}") as client:
            again = client.search_pixels(pixels, k=10, predict_class=True, min_class_confidence=0.01)
            assert client.last_trailers["cbmir-predicted-class"] == predicted and len(again) == 10
            voted = client.search_pixels(pixels, k=10, predict_class=True, min_class_confidence=0.01, class_vote=5)
            voted_class = client.last_trailers["cbmir-predicted-class"]
            assert len(voted) == 10 and {h.metadata["label"] for h in voted} == {voted_class}
        for wrong in (
            build_request(archive_id=data.ids[0], predict_class=True),
            build_request(pixels=pixels, class_vote=5),
            build_request(pixels=pixels, predict_class=True, class_vote=101),
        ):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Search(wrong, timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, wrong
        channel.close()
    finally:
        running.stop(0)
