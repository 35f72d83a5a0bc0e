"""Extraction on a real local Ray (num_cpus=2): the same descriptors, records and hits as in-process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cbmir.extractors import create_extractor
from cbmir.index_build import build_bundle, load_bundle, open_archive
from cbmir.index_build.build import extract_archive
from cbmir.index_build.ray_extraction import LOCAL_START_ATTEMPTS, RayOptions, extract_archive_ray, start_ray
from cbmir.server.search_engine import SearchEngine
from tests.helpers import UNIFESP, require

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A real local Ray, started as ``cbmir build --ray`` starts it (retried when its start times out), with 120 s
    instead of 30 for its GCS to come up on two cores shared with the other test worker."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_gcs_server_port_wait_time_s", "120")
        start_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def archive_200(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """200 single-label UNIFESP radiographs and one file that is not an image."""
    root = require(UNIFESP)
    with open(root / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["single_label"] == "1"][:200]
    out = tmp_path_factory.mktemp("ray") / "labels.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root, out


def test_ray_extraction_equals_in_process(local_ray: None, archive_200: tuple[Path, Path]) -> None:
    archive = open_archive(*archive_200)
    methods = {
        "cnn": create_extractor("cnn", image_size=96, device="cpu"),
        "hog": create_extractor("hog", device="cpu"),
        "bovw": create_extractor("bovw", words=64, kmeans_iters=5, device="cpu"),
    }
    methods["bovw"].fit([archive.load(i).image for i in range(0, 200, 4)])
    local = extract_archive(archive, methods, batch_size=32, progress=False)
    distributed = extract_archive_ray(archive, methods, batch_size=32, progress=False)
    assert [r[0] for r in distributed.records] == [r[0] for r in local.records] == [e.id for e in archive.entries]
    assert [r[2] for r in distributed.records] == [r[2] for r in local.records]
    assert [r[3] for r in distributed.records] == [r[3] for r in local.records]
    for name in ("cnn", "hog"):
        assert np.abs(distributed.raw[name] - local.raw[name]).max() <= 1e-5
    np.testing.assert_array_equal(distributed.raw["bovw"], local.raw["bovw"])


def test_ray_build_gives_the_in_process_bundle_hits(
    local_ray: None, archive_200: tuple[Path, Path], tmp_path: Path
) -> None:
    configs = {"cnn": {"image_size": 96}, "hog": {}}
    build_bundle(open_archive(*archive_200), tmp_path / "local", configs, device="cpu", progress=False)
    report = build_bundle(
        open_archive(*archive_200), tmp_path / "ray", configs, device="cpu", progress=False, ray=RayOptions(actors=2)
    )
    local, distributed = load_bundle(tmp_path / "local"), load_bundle(tmp_path / "ray")
    assert distributed.ids == local.ids and distributed.metadata == local.metadata
    assert distributed.manifest["build"]["ray"] == {"address": None, "actors": 2}
    assert report.count == 200
    for method in ("cnn", "hog"):
        q = local.methods[method].descriptors
        a = SearchEngine(local, device="cpu").search(method, q, 10)
        b = SearchEngine(distributed, device="cpu").search(method, distributed.methods[method].descriptors, 10)
        assert (a.rows == b.rows).mean() >= 0.99


def test_a_local_ray_that_cannot_start_ends_the_build_in_one_line(
    archive_200: tuple[Path, Path], tmp_path: Path
) -> None:
    """Ray's GCS given no time to publish its port: every start times out, and the build says what to do."""
    root, labels = archive_200
    command = [sys.executable, "-m", "cbmir.cli", "build", "--images", str(root), "--labels", str(labels)]
    command += ["--out", str(tmp_path / "b"), "--extractors", "hog", "--ray", "--no-progress"]
    env = {**os.environ, "RAY_gcs_server_port_wait_time_s": "0", "RAY_ADDRESS": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.count("local Ray did not start (attempt") == LOCAL_START_ATTEMPTS
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a local Ray did not start") and "ray start --head" in last
    assert not (tmp_path / "b").exists()
