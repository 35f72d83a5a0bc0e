"""The manifest is verified, not trusted: bit flips are caught by its checksum, and every field mutated (type,
range, removal) is refused with a message naming manifest.json and the field, or proven harmless."""

from __future__ import annotations

import copy
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cbmir.cli import main
from cbmir.errors import BundleError
from cbmir.index_build import build_bundle, load_bundle, open_archive
from cbmir.index_build.manifest import MANIFEST_CHECKSUM, manifest_digest
from cbmir.server.search_engine import SearchEngine

EXTRACTORS = {"hog": {}, "cnn": {"model": "test_efficientnet", "weights": "random", "image_size": 32}}


@pytest.fixture(scope="module")
def hog_cnn_bundle(unifesp_subset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, labels = unifesp_subset
    out = tmp_path_factory.mktemp("manifest") / "b"
    build_bundle(open_archive(root, labels).select({"label": "Knee"}), out, EXTRACTORS, device="cpu", progress=False)
    return out


def answer(path: Path) -> list[list[int]]:
    """What the bundle serves: every method restored, the first three images searched."""
    bundle = load_bundle(path)
    engine = SearchEngine(bundle, device="cpu")
    engine.warmup()
    return [engine.search(m, bundle.methods[m].descriptors[:3], 5).rows.tolist() for m in sorted(bundle.methods)]


def with_manifest(source: Path, target: Path, manifest: Any, *, keep_checksum: bool = False) -> Path:
    """A copy of the bundle whose live manifest is ``manifest`` (with a matching checksum unless told)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    version = target / (target / "CURRENT").read_text().strip()
    data = json.dumps(manifest, indent=2).encode()
    (version / "manifest.json").write_bytes(data)
    if not keep_checksum:
        (version / MANIFEST_CHECKSUM).write_text(manifest_digest(data) + "\n")
    return target


def live_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / (path / "CURRENT").read_text().strip() / "manifest.json").read_text())


def leaves(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield prefix + (key,)
            yield from leaves(value, prefix + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj[:2]):
            yield prefix + (i,)
            yield from leaves(value, prefix + (i,))


def mutations(value: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [("removed", None), ("a list", [1]), ("a string", "x"), ("null", None)]
    if isinstance(value, bool):
        out.append(("flipped", not value))
    elif isinstance(value, int | float):
        out += [("negative", -1), ("zero", 0), ("plus one", value + 1), ("huge", 2**62)]
    elif isinstance(value, str):
        out += [("empty", ""), ("other", value + "x"), ("a path", "../../etc/passwd")]
    return out


def mutated(manifest: dict[str, Any], path: tuple[Any, ...], how: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(manifest)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if how == "removed":
        if isinstance(parent, list):
            parent.pop(path[-1])
        else:
            del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def check_refused_or_harmless(bundle: Path, target: Path, manifest: dict[str, Any], label: str, baseline) -> str:
    with_manifest(bundle, target, manifest)
    try:
        got = answer(target)
    except BundleError as exc:
        message = str(exc)
        assert "manifest.json" in message or ".npy" in message or ".npz" in message or "records." in message, (
            label,
            message,
        )
        return "refused"
    assert got == baseline, f"{label}: accepted but answers differently"
    return "harmless"


def test_bit_flips_in_the_manifest_are_caught_by_its_checksum(hog_cnn_bundle: Path, tmp_path: Path, capsys) -> None:
    version = hog_cnn_bundle / (hog_cnn_bundle / "CURRENT").read_text().strip()
    data = bytearray((version / "manifest.json").read_bytes())
    rng = random.Random(7)
    for _ in range(20):
        flipped = bytearray(data)
        bit = rng.randrange(len(flipped) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
        target = tmp_path / "flip"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(hog_cnn_bundle, target)
        (target / version.name / "manifest.json").write_bytes(bytes(flipped))
        with pytest.raises(BundleError, match="manifest.json: sha256 differs from manifest.sha256"):
            load_bundle(target)
        assert main(["info", "--index", str(target)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "manifest.json: sha256 differs" in err


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m["methods"]["hog"].update(metric="l3"), "methods.hog.metric"),
        (lambda m: m.update(count=m["count"] + 1), "records.parquet"),
        (lambda m: m["methods"]["hog"].update(dim=m["methods"]["hog"]["dim"] + 1), "hog.npy"),
        (lambda m: m["methods"]["hog"].update(index_type="lsh"), "methods.hog.index_type"),
        (
            lambda m: (m["methods"]["hog"].update(extractor="cnn"), m["methods"]["cnn"].update(extractor="hog")),
            "config",
        ),
        (lambda m: m["methods"]["hog"]["config"].update(cell=0), "methods.hog.config"),
        (lambda m: m.update(files={}), "files"),
        (lambda m: m["methods"]["hog"]["files"].update(descriptors="../cnn.npy"), "methods.hog.files.descriptors"),
    ],
)
def test_named_manifest_defects_are_refused_naming_the_field(hog_cnn_bundle: Path, tmp_path: Path, change, field):
    manifest = live_manifest(hog_cnn_bundle)
    change(manifest)
    target = with_manifest(hog_cnn_bundle, tmp_path / "bad", manifest)
    with pytest.raises(BundleError) as err:
        answer(target)
    assert field in str(err.value) and "Traceback" not in str(err.value), str(err.value)


def _all_mutations(manifest: dict[str, Any]) -> list[tuple[tuple[Any, ...], str, Any]]:
    out = []
    for path in leaves(manifest):
        parent: Any = manifest
        for key in path:
            parent = parent[key]
        for how, value in mutations(parent):
            out.append((path, how, value))
    return out


def _fuzz(bundle: Path, tmp_path: Path, sample: int | None) -> dict[str, int]:
    manifest = live_manifest(bundle)
    baseline = answer(bundle)
    cases = _all_mutations(manifest)
    if sample is not None:
        cases = random.Random(3).sample(cases, sample)
    outcome = {"refused": 0, "harmless": 0}
    for path, how, value in cases:
        label = ".".join(map(str, path)) + f" {how}"
        outcome[
            check_refused_or_harmless(bundle, tmp_path / "m", mutated(manifest, path, how, value), label, baseline)
        ] += 1
    return outcome


def test_sampled_manifest_mutations_are_refused_or_harmless(hog_cnn_bundle: Path, tmp_path: Path) -> None:
    outcome = _fuzz(hog_cnn_bundle, tmp_path, sample=40)
    assert outcome["refused"] > 0 and sum(outcome.values()) == 40


@pytest.mark.slow
def test_every_manifest_field_mutated_is_refused_or_harmless(hog_cnn_bundle: Path, tmp_path: Path) -> None:
    outcome = _fuzz(hog_cnn_bundle, tmp_path, sample=None)
    print(f"manifest mutations: {outcome}")
    assert outcome["refused"] > 100, outcome


def test_reload_onto_a_bad_manifest_is_failed_precondition(hog_cnn_bundle: Path, tmp_path: Path) -> None:
    import grpc

    from cbmir.client import RetrievalClient
    from cbmir.server.config import ServerConfig
    from cbmir.server.startup import start_server

    target = tmp_path / "served"
    shutil.copytree(hog_cnn_bundle, target)
    running = start_server(ServerConfig(index=str(target), port=0, device="cpu"), wait_ready=True)
    try:
        manifest = live_manifest(target)
        manifest["methods"]["hog"]["metric"] = "l3"
        bad = tmp_path / "next"
        with_manifest(target, bad, manifest)
        version = (bad / "CURRENT").read_text().strip()
        shutil.copytree(bad / version, target / "v99990101T000000000000Z-bad000")
        (target / "CURRENT").write_text("v99990101T000000000000Z-bad000")
        with RetrievalClient(f"127.0.0.1:{running.port}") as client:
            with pytest.raises(grpc.RpcError) as err:
                client.reload()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "manifest.json: field methods.hog.metric" in err.value.details()
            assert (
                len(client.search_vector(np.zeros(load_bundle(hog_cnn_bundle).methods["hog"].dim), k=3, method="hog"))
                == 3
            )  # the loaded version keeps serving
    finally:
        running.stop(0)
