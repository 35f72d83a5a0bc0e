"""Columnar records: Parquet round trip, id look-up, format-1 bundles still served, updates convert them."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from cbmir.benchmarks.records_scale import write_format_1_copy
from cbmir.errors import BundleError
from cbmir.index_build import load_bundle, remove_from_bundle
from cbmir.index_build.bundle import resolve_version_dir
from cbmir.index_build.manifest import MANIFEST_CHECKSUM, manifest_digest
from cbmir.index_build.records import Records, read_records, rows_by_value, write_records
from cbmir.server.search_engine import SearchEngine

ROWS = [
    ("a/1.png", "file:///x/1.png", {"label": "Knee", "patient_id": "p1"}, "aa"),
    ('q"uote\\2', "zip://z.zip#2", {"label": "Chest"}, "bb"),
    ("ünï/3", "file:///x/3.png", {"label": "Knee", "site": "São Paulo"}, ""),
    ("b/0", "file:///x/0.png", {}, "cc"),
]


def test_parquet_round_trip_keeps_every_value(tmp_path):
    write_records(tmp_path / "r.parquet", Records.from_rows(ROWS))
    back = read_records(tmp_path / "r.parquet", len(ROWS))
    assert list(back.ids) == [r[0] for r in ROWS] and list(back.uris) == [r[1] for r in ROWS]
    assert list(back.content_sha256) == ["aa", "bb", "", "cc"]
    assert sorted(back.metadata) == ["label", "patient_id", "site"]
    assert [back.metadata_of(i) for i in range(len(ROWS))] == [r[2] for r in ROWS]
    assert list(np.asarray(back.metadata["label"])) == ["Knee", "Chest", "Knee", ""]
    assert back.metadata["label"].values.type.id != back.ids.values.type.id  # metadata is dictionary-encoded
    with pytest.raises(BundleError, match=r"r\.parquet: holds a different number of records"):
        read_records(tmp_path / "r.parquet", len(ROWS) + 1)
    table = pq.read_table(tmp_path / "r.parquet").drop_columns(["uri"])
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(BundleError, match=r"bad\.parquet: unreadable records.*'uri'"):
        read_records(tmp_path / "bad.parquet", len(ROWS))


def test_row_of_finds_every_id_and_nothing_else():
    records = Records.from_rows(ROWS)
    row_of = records.row_of
    assert [row_of[r[0]] for r in ROWS] == [0, 1, 2, 3]
    assert row_of.get("a/2") is None and "zzz" not in row_of and 3 not in row_of  # type: ignore[operator]
    assert row_of.rows(["b/0", "missing", 'q"uote\\2']).tolist() == [3, -1, 1]
    rng = np.random.default_rng(0)
    ids = [f"id-{i:05d}" for i in rng.permutation(5000)]
    big = Records.from_columns(ids, ids, {})
    probe = rng.integers(0, 5000, 200)
    assert [big.row_of[ids[i]] for i in probe] == probe.tolist()
    asked = [ids[i] for i in probe] + ["id-99999", "", "id-", "zzz", "id-00000x", "a"]  # misses below, between, above
    assert big.row_of.rows(asked).tolist() == probe.tolist() + [-1] * 6  # the batched bisection (>= 32 ids)
    assert big.row_of.rows(asked[:5] + ["nope"]).tolist() == probe[:5].tolist() + [-1]  # one by one


def test_take_concat_and_rows_by_value():
    records = Records.from_rows(ROWS)
    taken = records.take(np.array([3, 0]))
    assert list(taken.ids) == ["b/0", "a/1.png"] and taken.metadata_of(1) == ROWS[0][2]
    more = Records.from_rows([("new", "u", {"modality": "CT"}, "dd")])
    joined = records.concat(more)
    assert list(joined.ids) == [r[0] for r in ROWS] + ["new"]
    assert list(joined.metadata["modality"]) == ["", "", "", "", "CT"] and joined.metadata_of(4) == {"modality": "CT"}
    groups = rows_by_value(joined.metadata["label"])
    assert {k: v.tolist() for k, v in groups.items()} == {"Knee": [0, 2], "Chest": [1]}


def test_format_1_bundle_is_served_alike_and_converted_by_an_update(small_bundle, tmp_path):
    new = load_bundle(small_bundle)
    old_dir = write_format_1_copy(small_bundle, tmp_path / "old")
    old = load_bundle(old_dir)
    assert old.manifest["format_version"] == 1 and new.manifest["format_version"] == 2
    assert old.ids == new.ids and old.uris == new.uris and old.content_hashes == new.content_hashes
    assert {k: list(v) for k, v in old.metadata.items()} == {k: list(v) for k, v in new.metadata.items()}
    q = new.methods["hog"].descriptors[:5]
    engines = SearchEngine(old, device="cpu"), SearchEngine(new, device="cpu")
    a, b = (e.search("hog", q, 10, allowed=e.allowed_rows({"label": ["Knee"]})) for e in engines)
    np.testing.assert_array_equal(a.rows, b.rows)
    report = remove_from_bundle(old_dir, [new.ids[0], new.ids[7]])
    after = load_bundle(old_dir)
    assert after.manifest["format_version"] == 2 and "records.parquet" in after.manifest["files"]
    kept = [r for r in range(len(new)) if r not in (0, 7)]
    assert list(after.ids) == new.ids.take(np.array(kept)) and report.count == len(new) - 2
    assert [after.record_metadata(i) for i in range(len(after))] == [new.record_metadata(r) for r in kept]


def test_unknown_format_version_says_how_to_fix(small_bundle, tmp_path):
    dst = tmp_path / "future"
    shutil.copytree(small_bundle, dst)
    version = resolve_version_dir(dst)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["format_version"] = 3
    data = json.dumps(manifest).encode()
    (version / "manifest.json").write_bytes(data)
    (version / MANIFEST_CHECKSUM).write_text(manifest_digest(data) + "\n")
    with pytest.raises(BundleError, match=r"format version 3 is not supported.*rebuild the bundle"):
        load_bundle(dst)
