"""Crash safety: killing a real build, add or remove process with SIGKILL at random moments never loses or
corrupts the live bundle version."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cbmir.cli import main
from cbmir.index_build import add_to_bundle, build_bundle, load_bundle, open_archive
from cbmir.index_build.bundle import Bundle, resolve_version_dir
from tests.helpers import subset_csv

KILLS = 8
SLOW_KILLS = 50
WRITE_PHASE_TRIES = 3


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cbmir.cli", *args]


def _wait_for_write_phase(
    path: Path, proc: subprocess.Popen[bytes], leftovers: set[Path], timeout: float = 120.0
) -> bool:
    """Block until the writer has created its own temporary version folder (the write/commit phase began);
    ``leftovers`` are the folders killed writers left before it started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if set(path.glob(".tmp-*")) - leftovers:
            return True
        time.sleep(0.0005)
    return False


def _check_live_version(path: Path, before: Bundle, expected_count: int, attempt: int) -> None:
    """The live version loads and verifies, holds the count before or after the operation, and rows that
    survived are unchanged."""
    after = load_bundle(path)  # verifies every checksum; raises naming the file otherwise
    assert len(after) in (len(before), expected_count), (attempt, len(before), len(after))
    if after.version != before.version:
        assert after.path.name == after.version and resolve_version_dir(path) == after.path
    for name, method in after.methods.items():
        assert method.descriptors.shape == (len(after), method.dim), name
        assert np.isfinite(method.descriptors).all()
    common = set(before.ids) & set(after.ids)
    for rid in list(common)[:20]:
        np.testing.assert_array_equal(
            after.methods["hog"].descriptors[after.row_of[rid]],
            before.methods["hog"].descriptors[before.row_of[rid]],
        )
    assert main(["info", "--index", str(path)]) == 0


def _kill_at_random_moments(unifesp_subset, tmp_path: Path, kills: int, write_phase_share: float) -> None:
    """Run real build/add/remove processes and SIGKILL them: after each kill the live version loads and verifies,
    holds exactly the count before or after the operation, and rows that survived are unchanged."""
    root, labels = unifesp_subset
    first = subset_csv(labels, tmp_path / "first.csv", slice(0, 60))
    second = subset_csv(labels, tmp_path / "second.csv", slice(60, 90))
    second_ids = {e.id for e in open_archive(root, second).entries}
    path = tmp_path / "b"
    build_bundle(open_archive(root, first), path, {"hog": {}, "cnn": {"image_size": 32}}, device="cpu", progress=False)
    rng = np.random.default_rng(int(os.environ.get("CBMIR_KILL_SEED", "7")))
    add = _cli(
        "add", "--index", str(path), "--images", str(root), "--labels", str(second), "--device", "cpu", "--no-progress"
    )
    remove = _cli("remove", "--index", str(path), "--ids", "images/00000.png", "--missing-ok")
    build = _cli(
        "build",
        "--images",
        str(root),
        "--labels",
        str(first),
        "--extractors",
        "hog,cnn",
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--out",
        str(path),
        "--no-progress",
    )

    def expected_after(cmd: list[str], before_ids: set[str]) -> int:
        if cmd is add:
            return len(before_ids | second_ids)
        if cmd is remove:
            return len(before_ids - {"images/00000.png"})
        return 60

    # Every `aim_every`-th attempt aims at the write/commit phase. It runs `build`, the one command that always
    # writes a version (an add with nothing new or a remove of a missing id writes none), and is retried when the
    # process finished before it could be killed there, so the share does not depend on the machine's speed.
    aim_every = max(1, round(1 / write_phase_share))
    runs = completed = in_write_phase = 0
    for attempt in range(kills):
        aim_at_write = attempt % aim_every == aim_every - 1
        cmd = build if aim_at_write else (add, remove, build)[attempt % 3]
        for _ in range(WRITE_PHASE_TRIES if aim_at_write else 1):
            before = load_bundle(path)
            leftovers = set(path.glob(".tmp-*"))
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            caught = aim_at_write and _wait_for_write_phase(path, proc, leftovers)
            time.sleep(float(rng.uniform(0.0, 0.05) if aim_at_write else rng.uniform(0.5, 6.0)))
            killed = proc.poll() is None
            if killed:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            runs += 1
            completed += not killed
            in_write_phase += caught and killed
            _check_live_version(path, before, expected_after(cmd, set(before.ids)), attempt)
            if (caught and killed) or not aim_at_write:
                break
    subprocess.run(add, check=True, capture_output=True)
    final = load_bundle(path)
    assert set(final.ids) >= second_ids
    assert not list(path.glob(".tmp-*")), "a finished update prunes the temporary directories of killed ones"
    assert runs - completed >= 3, "too few processes were killed mid-way to exercise the crash paths"
    assert in_write_phase >= kills // aim_every / 2, "too few kills landed in the write/commit phase"


def test_sigkill_at_random_points_never_corrupts_the_bundle(unifesp_subset, tmp_path: Path) -> None:
    _kill_at_random_moments(unifesp_subset, tmp_path, KILLS, write_phase_share=0.25)


@pytest.mark.slow
def test_fifty_sigkills_including_the_write_and_commit_phase(unifesp_subset, tmp_path: Path) -> None:
    _kill_at_random_moments(unifesp_subset, tmp_path, SLOW_KILLS, write_phase_share=0.5)


def test_crash_leftovers_are_cleaned_and_the_previous_version_kept(unifesp_subset, tmp_path: Path) -> None:
    root, labels = unifesp_subset
    first = subset_csv(labels, tmp_path / "first.csv", slice(0, 30))
    second = subset_csv(labels, tmp_path / "second.csv", slice(30, 40))
    path = tmp_path / "b"
    build_bundle(open_archive(root, first), path, {"hog": {}}, device="cpu", progress=False)
    live = (path / "CURRENT").read_text().strip()
    # what a writer killed between publishing its folder and switching CURRENT leaves behind
    orphan = path / "v99991231T235959999999Z-dead00"
    shutil.copytree(path / live, orphan)
    (path / ".CURRENT.deadbeef").write_text(orphan.name)
    (path / ".tmp-0123456789ab").mkdir()
    add_to_bundle(path, open_archive(root, second), progress=False)
    new = (path / "CURRENT").read_text().strip()
    versions = sorted(p.name for p in path.iterdir() if p.name.startswith("v"))
    assert versions == sorted([live, new]), versions  # the orphan went, the replaced live version stayed
    assert not list(path.glob(".CURRENT.*")) and not list(path.glob(".tmp-*"))
    assert len(load_bundle(path)) == 40


def test_a_first_build_killed_before_current_leaves_out_usable(unifesp_subset, tmp_path: Path) -> None:
    root, labels = unifesp_subset
    first = subset_csv(labels, tmp_path / "first.csv", slice(0, 20))
    path = tmp_path / "b"
    build_bundle(open_archive(root, first), path, {"hog": {}}, device="cpu", progress=False)
    (path / "CURRENT").unlink()  # as if the first build died right before publishing
    (path / ".CURRENT.cafe").write_text("x")
    build_bundle(open_archive(root, first), path, {"hog": {}}, device="cpu", progress=False)
    assert len(load_bundle(path)) == 20
    assert len([p for p in path.iterdir() if p.name.startswith("v")]) == 1
