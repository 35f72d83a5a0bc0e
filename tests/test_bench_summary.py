"""The benchmark summary renders every recorded throughput run, with or without a bundle."""

from __future__ import annotations

import json
from pathlib import Path

from cbmir.benchmarks.summary import bench_summary


def test_throughput_rows_name_the_source_runtime_and_share_of_peak(tmp_path: Path) -> None:
    fresh = {"extractor": "hog", "bundle": None, "device": "cpu", "images_per_s": 697.0}
    fresh |= {"baseline_images_per_s": 33.2, "speedup": 21.01, "config": {"image_size": 256}}
    restored = {"extractor": "cnn", "bundle": "/b/mednist-fast", "device": "cpu", "images_per_s": 476.4}
    restored |= {"baseline_images_per_s": 33.2, "speedup": 14.36, "config": {"image_size": 128}}
    restored |= {"runtime": "openvino", "precision": "fp32", "fraction_of_peak": 0.781, "peak_kind": "fp32"}
    (tmp_path / "throughput.json").write_text(json.dumps({"runs": [fresh, restored]}))
    rows = [
        line for line in bench_summary(tmp_path).splitlines() if line.startswith("| hog") or line.startswith("| cnn")
    ]
    assert rows == [
        "| hog | created here | 256 | - | cpu | 697.0 | 33.2 | 21.01 | - |",
        "| cnn | mednist-fast | 128 | openvino / fp32 | cpu | 476.4 | 33.2 | 14.36 | 0.78 of fp32 |",
    ]
