"""Search on a real Milvus (milvus-lite): the hits of in-process FAISS, literal filters, clear failures."""

from __future__ import annotations

import csv
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbmir.client import RetrievalClient, RetrievalError
from cbmir.errors import InvalidInputError
from cbmir.index_build import add_to_bundle, build_bundle, load_bundle, open_archive
from cbmir.server.config import ServerConfig
from cbmir.server.search_engine import SearchEngine
from cbmir.server.startup import RunningServer, start_server
from tests.helpers import UNIFESP, require

pytest.importorskip("milvus_lite")
from cbmir.search_backends.milvus_backend import MilvusBackend
from cbmir.search_backends.milvus_publish import connect_milvus, publish_bundle


@pytest.fixture(scope="module")
def single_label(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The 1,606 single-label UNIFESP radiographs."""
    root = require(UNIFESP)
    with open(root / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["single_label"] == "1"]
    out = tmp_path_factory.mktemp("milvus") / "labels.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root, out


@pytest.fixture(scope="module")
def published(single_label: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A flat cnn/hog/bovw bundle of the single-label set, published to a milvus-lite file."""
    folder = tmp_path_factory.mktemp("milvus-bundle")
    build_bundle(
        open_archive(*single_label),
        folder / "b",
        {"cnn": {"image_size": 96}, "hog": {}, "bovw": {"words": 64, "kmeans_iters": 5}},
        device="cpu",
        progress=False,
    )
    uri = str(folder / "milvus.db")
    client = connect_milvus(uri)
    first = publish_bundle(load_bundle(folder / "b", search_indexes=False), client, "t")
    again = publish_bundle(load_bundle(folder / "b", search_indexes=False), client, "t")
    assert not first.reused and sorted(again.reused) == sorted(first.collections.values())  # idempotent
    assert {a for n in first.collections.values() for a in client.list_aliases(n)["aliases"]} == {
        "t_cnn",
        "t_hog",
        "t_bovw",
    }
    client.close()
    yield folder / "b", uri


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x[x >= 0]) & set(y[y >= 0])) / max(1, (x >= 0).sum()) for x, y in zip(a, b)]))


def test_milvus_backend_returns_the_faiss_hits(published: tuple[Path, str]) -> None:
    path, uri = published
    local = SearchEngine(load_bundle(path), device="cpu")
    bundle = load_bundle(path, search_indexes=False)
    client = connect_milvus(uri)
    remote = SearchEngine(bundle, device="cpu", backend=MilvusBackend(bundle, client, uri, "t"))
    rows = np.arange(0, len(bundle), 8)
    patients = np.asarray(bundle.metadata["patient_id"])
    exclude = [np.flatnonzero(patients == patients[r]) for r in rows]
    knee_or_chest = {"label": ["Knee", "Chest"]}
    for method in ("cnn", "hog", "bovw"):
        q = bundle.methods[method].descriptors[rows]
        plain = [local.search(method, q, 10), remote.search(method, q, 10)]
        assert _agreement(plain[0].rows, plain[1].rows) >= 0.99
        np.testing.assert_allclose(plain[0].distances[:, 0], plain[1].distances[:, 0], atol=2e-3)
        filtered = [
            e.search(method, q, 10, allowed=e.allowed_rows(knee_or_chest), exclude=exclude) for e in (local, remote)
        ]
        assert _agreement(filtered[0].rows, filtered[1].rows) >= 0.99
        labels = np.asarray(bundle.metadata["label"])[filtered[1].rows[filtered[1].rows >= 0]]
        assert set(labels) <= {"Knee", "Chest"}
        for j in range(len(rows)):
            assert not np.isin(filtered[1].rows[j], exclude[j]).any()
    hog_q = bundle.methods["hog"].descriptors[rows]
    reranked = [
        e.search("cnn", bundle.methods["cnn"].descriptors[rows], 10, rerank="hog", rerank_queries=hog_q, k_prep=50)
        for e in (local, remote)
    ]
    assert _agreement(reranked[0].rows, reranked[1].rows) >= 0.99
    client.close()


def _serve(path: Path, **milvus: str) -> RunningServer:
    return start_server(ServerConfig(index=str(path), port=0, device="cpu", **milvus), wait_ready=True)


def test_grpc_server_on_milvus_answers_like_faiss(published: tuple[Path, str], single_label: tuple[Path, Path]) -> None:
    path, uri = published
    root, labels = single_label
    with open(labels, newline="") as fh:
        rows = list(csv.DictReader(fh))[::40]
    faiss_server, milvus_server = _serve(path), _serve(path, milvus=uri, milvus_collection="t")
    try:
        with (
            RetrievalClient(f"127.0.0.1:{faiss_server.port}") as a,
            RetrievalClient(f"127.0.0.1:{milvus_server.port}") as b,
        ):
            options_list: list[dict] = [
                {"method": "cnn"},
                {"method": "hog", "filters": {"label": ["Knee", "Chest", "Abdomen"]}},
                {"method": "bovw", "exclude_ids": []},
                {"method": "cnn", "rerank": "hog", "k_prep": 30},
            ]
            shared = np.zeros(len(options_list))
            for row in rows:
                image = (root / row["path"]).read_bytes()
                for o, options in enumerate(options_list):
                    if "exclude_ids" in options:
                        options = {**options, "exclude_ids": [row["path"]]}
                    ids_a = [h.id for h in a.search_image(image, k=10, **options)]
                    ids_b = [h.id for h in b.search_image(image, k=10, **options)]
                    assert (
                        len(ids_a) == len(ids_b) == 10
                        and row["path"] not in ids_b[: 10 if "exclude_ids" in options else 0]
                    )
                    shared[o] += len(set(ids_a) & set(ids_b)) / 10
            assert (shared / len(rows) >= 0.99).all(), shared / len(rows)
            milvus_server.service._milvus.close()  # Milvus goes away while serving
            with pytest.raises(RetrievalError) as err:
                b.search_image((root / rows[0]["path"]).read_bytes(), k=5, method="cnn")
            assert err.value.status == "UNAVAILABLE" and uri in err.value.message
    finally:
        faiss_server.stop(grace=None)
        milvus_server.stop(grace=None)


def test_filter_values_match_literally(tmp_path: Path) -> None:
    """Quotes, backslashes and injection-style text in metadata match only themselves."""
    hostile = ['a"b', "c\\d", '" or 1==1 or "', "plain", "x' or '1'='1", "ü ünïcode"]
    rng = np.random.default_rng(0)
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for i in range(48):
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(tmp_path / f"{i}.png")
            writer.writerow([f"{i}.png", hostile[i % len(hostile)]])
    build_bundle(open_archive(tmp_path, tmp_path / "labels.csv"), tmp_path / "b", {"hog": {}}, progress=False)
    bundle = load_bundle(tmp_path / "b", search_indexes=False)
    client = connect_milvus(str(tmp_path / "m.db"))
    publish_bundle(bundle, client, "h")
    engine = SearchEngine(bundle, device="cpu", backend=MilvusBackend(bundle, client, str(tmp_path / "m.db"), "h"))
    q = bundle.methods["hog"].descriptors[:2]
    for value in hostile:
        result = engine.search("hog", q, 48, allowed=engine.allowed_rows({"label": [value]}))
        got = result.rows[result.rows >= 0]
        assert len(got) == 2 * 8 and {bundle.metadata["label"][r] for r in got} == {value}
    client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unpublished_or_stale_collections_fail_at_start_up(
    published: tuple[Path, str], single_label: tuple[Path, Path], tmp_path: Path
) -> None:
    path, uri = published
    with pytest.raises(InvalidInputError, match=r"no collection other_cnn_v\w+ .*cbmir publish"):
        _serve(path, milvus=uri, milvus_collection="other")
    with pytest.raises(InvalidInputError, match="cannot reach Milvus at http://127.0.0.1"):
        _serve(path, milvus=f"http://127.0.0.1:{_free_port()}")
    stale = tmp_path / "stale"
    build_bundle(open_archive(*single_label).select({"label": "Knee"}), stale, {"hog": {}}, progress=False)
    stale_uri = str(tmp_path / "stale.db")
    client = connect_milvus(stale_uri)
    publish_bundle(load_bundle(stale, search_indexes=False), client, "s")
    client.close()
    root, labels = single_label
    add_to_bundle(stale, open_archive(root, labels).select({"label": "Chest"}), progress=False)
    with pytest.raises(InvalidInputError, match="for bundle version .*cbmir publish"):
        _serve(stale, milvus=stale_uri, milvus_collection="s")
