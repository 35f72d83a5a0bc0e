"""Incremental updates: add and remove produce new versions without re-extracting, with stable ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cbmir.cli import main
from cbmir.errors import InvalidInputError, NotFoundError
from cbmir.index_build import add_to_bundle, build_bundle, load_bundle, open_archive, remove_from_bundle
from cbmir.index_build.bundle import resolve_version_dir
from tests.helpers import subset_csv

EXTRACTORS = {"cnn": {"image_size": 64}, "hog": {}}


@pytest.fixture()
def split_archive(unifesp_subset, tmp_path: Path):
    root, labels = unifesp_subset
    first = subset_csv(labels, tmp_path / "first.csv", slice(0, 60))
    second = subset_csv(labels, tmp_path / "second.csv", slice(60, 90))
    return root, labels, first, second


def test_add_keeps_existing_rows_and_matches_a_full_build(split_archive, tmp_path: Path) -> None:
    root, labels, first, second = split_archive
    build_bundle(open_archive(root, first), tmp_path / "inc", EXTRACTORS, device="cpu", progress=False)
    before = load_bundle(tmp_path / "inc")
    report = add_to_bundle(tmp_path / "inc", open_archive(root, second), device="cpu", progress=False)
    after = load_bundle(tmp_path / "inc")
    assert len(report.added) == 30 and report.count == 90 and after.version != before.version
    assert after.ids[:60] == before.ids and after.content_hashes[:60] == before.content_hashes
    build_bundle(open_archive(root, labels), tmp_path / "full", EXTRACTORS, device="cpu", progress=False)
    full = load_bundle(tmp_path / "full")
    order = [full.row_of[i] for i in after.ids]
    for name in EXTRACTORS:
        np.testing.assert_array_equal(after.methods[name].descriptors[:60], before.methods[name].descriptors)
        np.testing.assert_allclose(after.methods[name].descriptors, full.methods[name].descriptors[order], atol=1e-5)
    assert after.metadata["label"] == [full.metadata["label"][r] for r in order]
    assert [h["op"] for h in after.manifest["history"]] == ["add"]


def test_re_adding_the_same_pixels_adds_nothing(split_archive, tmp_path: Path) -> None:
    root, _, first, _ = split_archive
    build_bundle(open_archive(root, first), tmp_path / "b", {"hog": {}}, device="cpu", progress=False)
    version = resolve_version_dir(tmp_path / "b")
    report = add_to_bundle(tmp_path / "b", open_archive(root, first), id_prefix="copy/", progress=False)
    assert report.added == [] and len(report.duplicates) == 60
    assert resolve_version_dir(tmp_path / "b") == version


def test_an_id_with_new_pixels_is_refused_and_nothing_is_written(split_archive, tmp_path: Path) -> None:
    root, _, first, _ = split_archive
    build_bundle(open_archive(root, first), tmp_path / "b", {"hog": {}}, device="cpu", progress=False)
    version = resolve_version_dir(tmp_path / "b")
    clash = tmp_path / "clash"
    (clash / "images").mkdir(parents=True)
    target = open_archive(root, first).entries[0].id
    img = (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)
    import cv2

    cv2.imwrite(str(clash / target), img)
    with pytest.raises(InvalidInputError, match="already indexed with different pixels"):
        add_to_bundle(tmp_path / "b", open_archive(clash), progress=False)
    assert resolve_version_dir(tmp_path / "b") == version


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_remove_drops_only_the_named_ids(split_archive, tmp_path: Path, index_type: str) -> None:
    root, _, first, _ = split_archive
    build_bundle(
        open_archive(root, first), tmp_path / "b", {"hog": {}}, device="cpu", progress=False, index_type=index_type
    )
    before = load_bundle(tmp_path / "b")
    gone = before.ids[5:15]
    report = remove_from_bundle(tmp_path / "b", gone)
    after = load_bundle(tmp_path / "b")
    assert report.removed == gone and len(after) == 50 and not set(gone) & set(after.ids)
    keep = [before.row_of[i] for i in after.ids]
    np.testing.assert_array_equal(after.methods["hog"].descriptors, before.methods["hog"].descriptors[keep])
    assert after.methods["hog"].index.ntotal == 50
    _, hits = after.methods["hog"].index.search(after.methods["hog"].descriptors[:3], 1)
    assert hits[:, 0].tolist() == [0, 1, 2]
    with pytest.raises(NotFoundError):
        remove_from_bundle(tmp_path / "b", ["no/such/id"])
    with pytest.raises(InvalidInputError, match="empty"):
        remove_from_bundle(tmp_path / "b", after.ids)
    assert load_bundle(tmp_path / "b").version == after.version


@pytest.mark.parametrize(("method", "index_type", "params"), [("hog", "hnsw", None), ("cnn", "itq", {"bits": 16})])
def test_add_to_an_approximate_index_extends_it(split_archive, tmp_path: Path, method, index_type, params) -> None:
    root, _, first, second = split_archive
    build_bundle(
        open_archive(root, first),
        tmp_path / "b",
        {method: EXTRACTORS[method]},
        device="cpu",
        progress=False,
        index_type=index_type,
        index_params=params,
    )
    add_to_bundle(tmp_path / "b", open_archive(root, second), progress=False)
    bundle = load_bundle(tmp_path / "b")
    method = bundle.methods[method]
    assert method.index.ntotal == 90 and method.index_type == index_type
    _, hits = method.index.search(method.descriptors[60:63], 1)
    assert hits[:, 0].tolist() == [60, 61, 62]


def test_cli_add_and_remove(split_archive, tmp_path: Path, capsys) -> None:
    root, _, first, second = split_archive
    build_bundle(open_archive(root, first), tmp_path / "b", {"hog": {}}, device="cpu", progress=False)
    assert (
        main(["add", "--index", str(tmp_path / "b"), "--images", str(root), "--labels", str(second), "--no-progress"])
        == 0
    )
    assert "30 added" in capsys.readouterr().out
    ids = load_bundle(tmp_path / "b").ids[:2]
    assert main(["remove", "--index", str(tmp_path / "b"), "--ids", *ids]) == 0
    assert len(load_bundle(tmp_path / "b")) == 88
    assert main(["remove", "--index", str(tmp_path / "b"), "--ids", "missing"]) == 2
