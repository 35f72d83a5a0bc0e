import zipfile

import numpy as np
import pytest
from PIL import Image

from cbmir.errors import InvalidInputError, NotFoundError
from cbmir.index_build import build_bundle, open_archive
from tests.helpers import MEDNIST_ZIP, PNEUMONIA, UNIFESP, require


def test_folder_labels_from_csv_and_select(unifesp_subset):
    root, labels = unifesp_subset
    archive = open_archive(root, labels)
    assert len(archive) == 90
    assert archive.entries[0].id.startswith("images/") and archive.entries[0].metadata["patient_id"]
    knees = archive.select({"label": "Knee"})
    assert len(knees) == 30
    record = knees.load(0)
    assert record.image.dtype == np.float32 and record.image.ndim == 2
    with Image.open(root / record.id) as img:  # 8-bit PNG: exactly its grey levels / 255
        np.testing.assert_allclose(record.image, np.asarray(img.convert("L"), np.float32) / 255, atol=1e-6)
    with pytest.raises(InvalidInputError, match="unknown metadata"):
        archive.select({"colour": "blue"})


def test_folder_without_csv_labels_by_folder_and_reports_unreadable(tmp_path):
    src = require(UNIFESP) / "images"
    for cls, names in {"chest": ["00000.png", "00001.png"], "hand": ["00002.png"]}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            (tmp_path / cls / n).write_bytes((src / n).read_bytes())
    (tmp_path / "hand" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    archive = open_archive(tmp_path)
    assert sorted(e.metadata["label"] for e in archive.entries) == ["chest", "chest", "hand", "hand"]
    skipped = []
    report = build_bundle(
        archive, tmp_path.parent / "out", {"hog": {}}, device="cpu", progress=False, on_skip=skipped.append
    )
    assert report.count == 3 and len(report.skipped) == 1 == len(skipped)
    assert "broken.png" in report.skipped[0]["uri"] and "cannot decode" in report.skipped[0]["error"]


def test_zip_with_labels_csv_reads_mednist_members():
    archive = open_archive(require(MEDNIST_ZIP))
    assert len(archive) == 58954
    entry = archive.entries[0]
    assert entry.id == "AbdomenCT/000000.jpeg"
    assert entry.metadata["modality"] == "CT" and entry.metadata["body_region"] == "abdomen"
    record = archive.load(0)
    assert record.image.shape == (64, 64)


def test_npz_splits_become_records_with_labels():
    archive = open_archive(require(PNEUMONIA))
    assert len(archive) == 3882 + 524 + 624
    splits = {e.metadata["split"] for e in archive.entries}
    assert splits == {"train", "val", "test"}
    test_entries = [e for e in archive.entries if e.metadata["split"] == "test"]
    assert sum(e.metadata["label"] == "1" for e in test_entries) == 390
    assert archive.load(0).image.shape == (28, 28)


def test_bad_paths_fail_clearly(tmp_path):
    with pytest.raises(NotFoundError):
        open_archive(tmp_path / "missing")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError, match="zip"):
        open_archive(bad)
    with zipfile.ZipFile(tmp_path / "empty.zip", "w"):
        pass
    with pytest.raises(InvalidInputError, match="no images"):
        build_bundle(open_archive(tmp_path / "empty.zip"), tmp_path / "o", {"hog": {}}, progress=False)
