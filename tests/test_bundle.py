import json
import shutil

import numpy as np
import pytest

from cbmir.errors import BundleError, NotFoundError
from cbmir.index_build import build_bundle, load_bundle, open_archive
from cbmir.index_build.bundle import CURRENT, BundleWriter, resolve_version_dir


def test_round_trip_keeps_records_descriptors_and_extractors(small_bundle, unifesp_subset):
    bundle = load_bundle(small_bundle)
    assert len(bundle) == 90
    assert set(bundle.methods) == {"cnn", "hog", "bovw"}
    assert {m.metric for m in bundle.methods.values()} == {"l2", "l1", "cosine"}
    assert bundle.methods["hog"].dim == 540
    manifest = bundle.manifest
    assert manifest["count"] == 90 and manifest["methods"]["cnn"]["config"]["weights_sha256"]
    assert set(manifest["files"]) >= {"records.parquet", "cnn.npy", "hog.npy", "bovw.npy", "bovw.state.npz"}
    # Re-describing an archive image with the restored extractors reproduces its stored descriptor.
    from cbmir.server.search_engine import SearchEngine

    engine = SearchEngine(bundle, device="cpu")
    root, labels = unifesp_subset
    archive = open_archive(root, labels)
    row = bundle.row_of[archive.entries[5].id]
    image = archive.load(5).image
    for method in ("cnn", "hog", "bovw"):
        fresh = engine.describe(method, [image])[0]
        np.testing.assert_allclose(fresh, bundle.methods[method].descriptors[row], atol=1e-4)
    assert bundle.metadata["label"][row] == archive.entries[5].metadata["label"]


def _copy(small_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(small_bundle, dst)
    return dst, resolve_version_dir(dst)


def test_altered_file_is_refused_naming_it(small_bundle, tmp_path):
    dst, version = _copy(small_bundle, tmp_path)
    data = bytearray((version / "hog.npy").read_bytes())
    data[-1] ^= 0xFF
    (version / "hog.npy").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"hog\.npy.*sha256"):
        load_bundle(dst)


def test_truncated_file_is_refused_naming_it(small_bundle, tmp_path):
    dst, version = _copy(small_bundle, tmp_path)
    with open(version / "records.parquet", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(BundleError, match=r"records\.parquet.*truncated"):
        load_bundle(dst)


def test_missing_file_and_bad_manifest_are_refused(small_bundle, tmp_path):
    dst, version = _copy(small_bundle, tmp_path)
    (version / "bovw.state.npz").unlink()
    with pytest.raises(BundleError, match=r"bovw\.state\.npz.*missing"):
        load_bundle(dst)
    (version / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest"):
        load_bundle(dst)


def test_unknown_and_dangling_paths(tmp_path):
    with pytest.raises(NotFoundError):
        load_bundle(tmp_path / "nope")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / CURRENT).write_text("v-missing")
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path / "b")


def test_failed_write_leaves_previous_version_live(small_bundle, tmp_path):
    dst, version = _copy(small_bundle, tmp_path)
    with pytest.raises(RuntimeError):
        with BundleWriter(dst) as writer:
            writer.write_json("records.json", {"ids": []})
            raise RuntimeError("crash in the middle of a build")
    assert resolve_version_dir(dst) == version
    assert not list(dst.glob(".tmp-*"))
    assert len(load_bundle(dst)) == 90


def test_rebuild_publishes_a_new_version_atomically(unifesp_subset, tmp_path):
    root, labels = unifesp_subset
    archive = open_archive(root, labels).select({"label": "Knee"})
    first = build_bundle(archive, tmp_path / "b", {"hog": {}}, device="cpu", progress=False).path
    second = build_bundle(archive, tmp_path / "b", {"hog": {}}, device="cpu", progress=False).path
    assert first != second and resolve_version_dir(tmp_path / "b") == second
    np.testing.assert_array_equal(np.load(first / "hog.npy"), np.load(second / "hog.npy"))
    assert json.loads((second / "manifest.json").read_text())["count"] == 30


def test_refuses_to_write_into_a_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not an index bundle"):
        BundleWriter(tmp_path / "x")
    assert (tmp_path / "x" / "precious.txt").read_text() == "keep me"
