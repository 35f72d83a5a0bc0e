"""A newcomer's first mistakes: one line `error: ...`, exit 2 for usage errors and 1 for failures, never a
traceback or a process that keeps running (issue: newcomer-proof)."""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from cbmir.cli import build_parser, main
from cbmir.client import RetrievalClient, RetrievalError, build_request, format_hits
from cbmir.errors import InvalidInputError
from cbmir.search_backends.faiss_gpu import gpu_search_available
from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server
from tests.helpers import UNIFESP, require

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cbmir.cli", *args], capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def live(small_bundle: Path):
    running = start_server(ServerConfig(index=str(small_bundle), port=0, device="cpu"), wait_ready=True)
    yield running
    running.stop(0)


def test_serve_on_a_missing_bundle_exits_with_one_line(tmp_path: Path) -> None:
    done = run_cli("serve", "--index", str(tmp_path / "nonexistent"), "--port", "0", timeout=60)
    assert done.returncode == 2
    assert "nonexistent" in one_error_line(done.stderr) and "does not exist" in done.stderr


def test_serve_on_a_corrupt_bundle_exits_non_zero(small_bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small_bundle, broken)
    version = (broken / "CURRENT").read_text().strip()
    (broken / version / "hog.npy").write_bytes(b"garbage")
    done = run_cli("serve", "--index", str(broken), "--port", "0", timeout=120)
    assert done.returncode == 1
    assert "hog.npy" in one_error_line(done.stderr)


def test_serve_on_a_port_in_use_exits_with_one_line(small_bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--index", str(small_bundle), "--port", str(port), timeout=60)
    assert done.returncode == 1
    assert f"cannot bind 127.0.0.1:{port}" in one_error_line(done.stderr)


@NO_CUDA
def test_device_cuda_without_a_gpu_is_a_usage_error(small_bundle: Path, tmp_path: Path) -> None:
    serve = run_cli("serve", "--index", str(small_bundle), "--port", "0", "--device", "cuda", timeout=60)
    assert serve.returncode == 2 and "CUDA is not available" in one_error_line(serve.stderr)
    root, _ = (require(UNIFESP), None)
    build = run_cli(
        "build",
        "--images",
        str(root),
        "--out",
        str(tmp_path / "b"),
        "--extractors",
        "hog",
        "--device",
        "cuda",
        "--no-progress",
    )
    assert build.returncode == 2 and "CUDA is not available" in one_error_line(build.stderr)


@pytest.mark.skipif(gpu_search_available(), reason="needs a machine where FAISS cannot use a GPU")
def test_search_device_cuda_without_faiss_gpu_is_a_usage_error(small_bundle: Path) -> None:
    serve = run_cli("serve", "--index", str(small_bundle), "--port", "0", "--search-device", "cuda", timeout=60)
    line = one_error_line(serve.stderr)
    assert serve.returncode == 2 and "--search-device cuda" in line and "--search-device auto or cpu" in line


def test_query_errors_are_one_line_with_the_status(live, small_bundle: Path, tmp_path: Path, capsys) -> None:
    image = require(UNIFESP) / "images" / "00000.png"
    assert main(["query", "--target", f"127.0.0.1:{free_port()}", "--image", str(image), "--timeout", "5"]) == 1
    assert one_error_line(capsys.readouterr().err).startswith("error: UNAVAILABLE: ")
    target = f"127.0.0.1:{live.port}"
    assert main(["query", "--target", target, "--image", str(image), "-k", "101"]) == 2
    assert "INVALID_ARGUMENT: k must be between 1 and 100" in one_error_line(capsys.readouterr().err)
    assert main(["query", "--target", target, "--image", str(tmp_path / "missing.png")]) == 1
    assert "missing.png: No such file" in one_error_line(capsys.readouterr().err)
    assert main(["query", "--target", target, "--image", str(tmp_path)]) == 1
    assert "Is a directory" in one_error_line(capsys.readouterr().err)
    for bad_k in ("0", "-1"):
        with pytest.raises(SystemExit) as exit_:
            main(["query", "--target", target, "--image", str(image), "-k", bad_k])
        assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CBMIR_DEBUG", "1")
    with pytest.raises(Exception, match="does not exist"):
        main(["info", "--index", str(tmp_path / "nope")])


def test_info_on_a_binary_current_file_and_eval_on_a_full_disk(small_bundle: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "bin"
    shutil.copytree(small_bundle, broken)
    (broken / "CURRENT").write_bytes(b"\xff\xfe\x00\x81binary")
    assert main(["info", "--index", str(broken)]) == 1
    assert "CURRENT: unreadable" in one_error_line(capsys.readouterr().err)
    if Path("/dev/full").exists():
        code = main(["eval", "--index", str(small_bundle), "--methods", "hog", "--json", "/dev/full", "--no-progress"])
        assert code == 1
        assert "No space left on device; free space or write elsewhere" in one_error_line(capsys.readouterr().err)


def test_commands_print_no_third_party_info_lines(small_bundle: Path) -> None:
    done = run_cli("info", "--index", str(small_bundle))
    assert done.returncode == 0 and "faiss.loader" not in done.stderr and "INFO" not in done.stderr, done.stderr


def test_client_checks_arguments_and_raises_its_own_errors(live) -> None:
    with pytest.raises(InvalidInputError, match="k must be at least 1"):
        build_request(archive_id="x", k=0)
    request = build_request(archive_id="x", filters={"label": 3, "flag": True, "two": ["a", 2]})
    assert [(f.field, list(f.values)) for f in request.filters] == [
        ("label", ["3"]),
        ("flag", ["true"]),
        ("two", ["a", "2"]),
    ]
    with RetrievalClient(f"127.0.0.1:{live.port}") as client, pytest.raises(RetrievalError) as err:
        client.search_id("no/such/id", k=3)
    assert err.value.status == "NOT_FOUND" and err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no/such/id" in err.value.message


def test_query_table_shows_custom_metadata_columns(live, small_bundle: Path, capsys) -> None:
    image = require(UNIFESP) / "images" / "00000.png"
    assert (
        main(["query", "--target", f"127.0.0.1:{live.port}", "--image", str(image), "-k", "2", "--method", "hog"]) == 0
    )
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:3] == ["rank", "distance", "id"] and {"label", "patient_id", "single_label"} <= set(header)
    hits = RetrievalClient(f"127.0.0.1:{live.port}").search_id(load_first_id(small_bundle), k=2, method="hog")
    assert format_hits(hits, fields=["label"]).splitlines()[0].split() == ["rank", "distance", "id", "label"]


def load_first_id(bundle: Path) -> str:
    from cbmir.index_build import load_bundle

    return load_bundle(bundle).ids[0]


def test_every_option_has_help_and_shows_its_default() -> None:
    parser = build_parser()

    def parsers(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for p in parsers(parser):
        text = p.format_help()
        for action in p._actions:
            if action.dest == "help" or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{p.prog} {action.option_strings}: no help text"
            shows_default = action.default not in (None, False) and not action.required
            if shows_default:
                assert f"(default: {action.default})" in " ".join(text.split()), f"{p.prog} {action.option_strings}"


def test_bad_model_or_weights_are_refused_before_the_archive_is_read(tmp_path: Path) -> None:
    mednist = require(Path(str(UNIFESP)).parent / "mednist" / "mednist_58954_jpeg.zip")
    bad_model = run_cli(
        "build",
        "--images",
        str(mednist),
        "--out",
        str(tmp_path / "b"),
        "--extractors",
        "cnn",
        "--model",
        "efficientnet_b99",
        "--no-progress",
    )
    assert bad_model.returncode == 2 and "not a timm model" in one_error_line(bad_model.stderr)
    bad_weights = run_cli(
        "train",
        "--images",
        str(mednist),
        "--out",
        str(tmp_path / "m.pt"),
        "--weights",
        str(tmp_path / "none.pt"),
        "--no-progress",
    )
    assert bad_weights.returncode == 2 and "none.pt: no such file" in one_error_line(bad_weights.stderr)
    for done in (bad_model, bad_weights):
        assert "images" not in done.stderr.replace(str(mednist), "")  # no archive listing or decoding happened
    assert not (tmp_path / "b").exists()


def test_npz_splits_are_named_and_selectable(tmp_path: Path, caplog) -> None:
    import numpy as np

    from cbmir.index_build import load_bundle

    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(
        npz,
        train_images=(rng.random((4, 64, 64)) * 255).astype(np.uint8),
        train_labels=np.arange(4),
        test_images=(rng.random((3, 64, 64)) * 255).astype(np.uint8),
        test_labels=np.arange(3),
    )
    with caplog.at_level("WARNING", logger="cbmir"):
        assert (
            main(
                ["build", "--images", str(npz), "--out", str(tmp_path / "all"), "--extractors", "hog", "--no-progress"]
            )
            == 0
        )
    assert "holds the splits test, train and all of them are used; --select split=train uses one" in caplog.text
    assert len(load_bundle(tmp_path / "all")) == 7
    assert (
        main(
            [
                "build",
                "--images",
                str(npz),
                "--out",
                str(tmp_path / "train"),
                "--extractors",
                "hog",
                "--select",
                "split=train",
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(load_bundle(tmp_path / "train").ids) == [f"train/{i:06d}" for i in range(4)]


def test_bovw_on_small_images_sizes_its_vocabulary_quietly(tmp_path: Path) -> None:
    import json
    import zipfile

    from cbmir.index_build import load_bundle

    folder = tmp_path / "small"
    folder.mkdir()
    with zipfile.ZipFile(require(Path(str(UNIFESP)).parent / "mednist" / "mednist_58954_jpeg.zip")) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpeg"))[::1500][:40]
        for i, name in enumerate(names):
            (folder / f"{i:03d}.jpeg").write_bytes(zf.read(name))
    assert build_parser().parse_args(["build", "--images", "x", "--out", "y"]).extractors == "cnn,hog"
    done = run_cli(
        "build", "--images", str(folder), "--out", str(tmp_path / "b"), "--extractors", "bovw", "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING clustering" not in done.stderr and "please provide at least" not in done.stderr
    words = load_bundle(tmp_path / "b").methods["bovw"].config["words"]
    assert 2 <= words < 4000
    assert f"bovw: {words} visual words from" in done.stderr
    assert "fitting bovw on 40 images: done in" in done.stderr
    json.dumps(words)


def test_an_unreadable_file_is_reported_once_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "archive"
    folder.mkdir()
    for i in range(3):
        shutil.copy(require(UNIFESP) / "images" / f"{i:05d}.png", folder / f"{i}.png")
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 4)
    done = run_cli("build", "--images", str(folder), "--out", str(tmp_path / "b"), "--extractors", "hog")
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "skipped" in line and "broken.dcm" in line]
    assert len(warnings) == 1 and warnings[0].count("broken.dcm") == 1, done.stderr[-3000:]
    assert "<_io.BytesIO" not in done.stderr
