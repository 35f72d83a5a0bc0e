"""The site-shift protocol: realistic re-exports, reproducible, scored beside the unshifted queries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbmir.cli import main
from cbmir.errors import InvalidInputError
from cbmir.evaluation.protocols import score_rankings
from cbmir.evaluation.report import shift_table
from cbmir.evaluation.site_shift import evaluate_site_shift
from cbmir.index_build import load_bundle
from cbmir.server.search_engine import SearchEngine
from cbmir.training.reexport import SHIFTS, parse_shifts, shift_image


def test_each_shift_changes_the_image_within_range_and_reproducibly() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(0.5, 0.2, (96, 80)), 0, 1).astype(np.float32)
    for name in SHIFTS:
        a = shift_image(image, [name], np.random.default_rng(3))
        b = shift_image(image, [name], np.random.default_rng(3))
        assert a.shape == image.shape and a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - image).mean() > 1e-3, name


def test_shift_names_are_checked() -> None:
    assert parse_shifts("all") == list(SHIFTS)
    assert parse_shifts("noise,windows") == ["windows", "noise"]
    with pytest.raises(InvalidInputError, match="choose from windows, gamma, jpeg, resize, noise"):
        parse_shifts("windows,blur")


def test_unshifted_scores_equal_the_stored_descriptor_ranking(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    doc = evaluate_site_shift(bundle, ["hog"], ["label"], ["jpeg", "noise"], queries=40, seed=1, device="cpu")
    assert doc["queries"] == 40 and doc["shifts"] == ["jpeg", "noise"]
    rows = np.sort(np.random.default_rng(1).choice(len(bundle), size=40, replace=False))
    engine = SearchEngine(bundle, device="cpu")
    excluded = [np.asarray([r]) for r in rows]
    found = engine.search("hog", bundle.methods["hog"].descriptors[rows], 10, exclude=excluded).rows
    meta = {f: [c[r] for r in rows] for f, c in bundle.metadata.items()}
    expected = score_rankings(found, bundle.metadata, meta, excluded, "label")
    result = doc["results"][0]
    assert result["unshifted"]["P@1"] == expected["mP@k"][0]
    assert result["unshifted"]["seed_mAP"] == expected["seed_mAP"]
    assert 0.0 <= result["shifted"]["P@1"] <= 1.0


def test_cli_writes_the_shift_table(small_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    argv = ["eval", "--index", str(small_bundle), "--methods", "hog", "--shift", "gamma,resize"]
    assert main([*argv, "--shift-queries", "20", "--json", str(out), "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "site shift (gamma+resize, 20 queries, seed 0)" in printed and "| hog | label |" in printed
    assert json.loads(out.read_text())["site_shift"]["results"][0]["method"] == "hog"
    doc = json.loads(out.read_text())
    row = doc["site_shift"]["results"][0]
    table = shift_table(out)
    assert f"| hog | label | {row['unshifted']['P@1']:.3f} | {row['shifted']['P@1']:.3f} |" in table
    assert "Changes: gamma+resize; 20 queries, seed 0" in table
