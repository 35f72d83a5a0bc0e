"""Group-by, distance cut-off and paging against brute-force references on the UNIFESP subset."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from cbmir.client import RetrievalClient, build_request
from cbmir.index_build import load_bundle
from cbmir.server.config import ServerConfig
from cbmir.server.result_shaping import Shaping, shaped_search
from cbmir.server.search_engine import SearchEngine
from cbmir.server.startup import start_server


def full_ranking(engine: SearchEngine, row: int, allowed=None, **search) -> list[tuple[str, float]]:
    """The whole archive ranked for one archived query (itself excluded), ties broken by id."""
    bundle = engine.bundle
    method = search.pop("method", "hog")
    if search.get("rerank"):
        search["rerank_queries"] = bundle.methods[search["rerank"]].descriptors[row : row + 1]
    k = search["k_prep"] if search.get("rerank") else len(bundle)  # with a re-ranker: its k_prep candidates
    res = engine.search(
        method,
        bundle.methods[method].descriptors[row : row + 1],
        k,
        allowed=allowed,
        exclude=[np.array([row])],
        **search,
    )
    pairs = [(bundle.ids[r], float(d)) for r, d in zip(res.rows[0], res.distances[0]) if r >= 0]
    return sorted(pairs, key=lambda p: (p[1], p[0]))


def grouped(ranking: list[tuple[str, float]], group_of: dict[str, str], k: int, size: int) -> list[tuple[str, str]]:
    groups: dict[str, list[str]] = {}
    for archive_id, _ in ranking:
        members = groups.setdefault(group_of[archive_id] or archive_id, [])
        if len(members) < size:
            members.append(archive_id)
    return [(g, i) for g, members in list(groups.items())[:k] for i in members]


@pytest.fixture(scope="module")
def engine(small_bundle: Path) -> SearchEngine:
    return SearchEngine(load_bundle(small_bundle), device="cpu")


@pytest.mark.parametrize(("k", "size"), [(5, 1), (4, 2), (3, 3)])
def test_group_by_patient_equals_grouping_the_whole_ranking(engine: SearchEngine, k: int, size: int) -> None:
    bundle = engine.bundle
    group_of = dict(zip(bundle.ids, bundle.metadata["patient_id"]))
    rows = list(range(0, 90, 9))
    q = bundle.methods["hog"].descriptors[rows]
    shaped = shaped_search(engine, "hog", q, k, Shaping("patient_id", size), exclude=[np.array([r]) for r in rows])
    for row, answer in zip(rows, shaped):
        expected = grouped(full_ranking(engine, row), group_of, k, size)
        assert [(g, bundle.ids[r]) for g, r in zip(answer.groups, answer.rows)] == expected
        assert len(set(answer.ranks)) == k and answer.ranks == sorted(answer.ranks)


def test_pages_and_cut_off_are_slices_of_the_stable_ranking(engine: SearchEngine) -> None:
    bundle = engine.bundle
    q = bundle.methods["hog"].descriptors[7:8]
    ranking = full_ranking(engine, 7)
    pages = []
    for offset in (0, 6, 12, 18):
        (answer,) = shaped_search(engine, "hog", q, 6, Shaping(offset=offset), exclude=[np.array([7])])
        assert answer.ranks == list(range(offset + 1, offset + 1 + len(answer.rows)))
        pages += [(bundle.ids[r], d) for r, d in zip(answer.rows, answer.distances)]
    assert [i for i, _ in pages] == [i for i, _ in ranking[:24]]
    cut = ranking[10][1]
    (answer,) = shaped_search(engine, "hog", q, 50, Shaping(max_distance=cut), exclude=[np.array([7])])
    assert [bundle.ids[r] for r in answer.rows] == [i for i, d in ranking if d <= cut]
    chest = np.asarray(bundle.metadata["label"]) == "Chest"
    (answer,) = shaped_search(
        engine, "hog", q, 5, Shaping("patient_id", 2, offset=2), allowed=chest, exclude=[np.array([7])]
    )
    group_of = dict(zip(bundle.ids, bundle.metadata["patient_id"]))
    expected = grouped(full_ranking(engine, 7, allowed=chest), group_of, 7, 2)
    skipped = list(dict.fromkeys(g for g, _ in expected))[:2]
    assert [(g, bundle.ids[r]) for g, r in zip(answer.groups, answer.rows)] == [
        (g, i) for g, i in expected if g not in skipped
    ]


def test_over_grpc_with_a_re_ranker_and_bad_input(small_bundle: Path, engine: SearchEngine) -> None:
    running = start_server(ServerConfig(index=str(small_bundle), port=0, device="cpu"), wait_ready=True)
    try:
        client = RetrievalClient(f"127.0.0.1:{running.port}")
        bundle = engine.bundle
        query = bundle.ids[3]
        reranked = full_ranking(engine, 3, method="cnn", rerank="hog", k_prep=40)
        pages = []
        for offset in (0, 5, 10):
            hits = client.search_id(query, k=5, method="cnn", rerank="hog", k_prep=40, offset=offset)
            assert [h.rank for h in hits] == list(range(offset + 1, offset + 6))
            pages += [h.id for h in hits]
        assert pages == [i for i, _ in reranked[:15]]
        hits = client.search_id(query, k=3, method="hog", group_by="patient_id", group_size=2)
        group_of = dict(zip(bundle.ids, bundle.metadata["patient_id"]))
        assert [(h.group, h.id) for h in hits] == grouped(full_ranking(engine, 3), group_of, 3, 2)
        assert all(h.group == h.metadata["patient_id"] for h in hits)
        for kwargs, message in (
            ({"group_by": "colour"}, "unknown group_by field"),
            ({"group_by": "patient_id", "group_size": 101}, "group_size must be between 1 and 100"),
            ({"group_size": 2}, "group_size needs group_by"),
            ({"offset": 10_001}, "offset must be at most 10000"),
            ({"max_distance": float("nan")}, "max_distance"),
        ):
            request = (
                _nan_request(query) if message == "max_distance" else build_request(archive_id=query, k=3, **kwargs)
            )
            with pytest.raises(grpc.RpcError) as err:
                client.search(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    finally:
        running.stop(0)


def _nan_request(query: str):
    from cbmir.v1 import retrieval_pb2 as pb

    request = pb.SearchRequest(archive_id=query, k=3)
    request.max_distance = float("nan")
    return request


def test_index_info_reports_the_capabilities_and_limits(small_bundle: Path) -> None:
    running = start_server(ServerConfig(index=str(small_bundle), port=0, device="cpu", max_offset=500), wait_ready=True)
    try:
        info = RetrievalClient(f"127.0.0.1:{running.port}").index_info(timeout=5)
        assert {"group_by", "max_distance", "offset", "thumbnails", "ingest", "remove"} <= set(info.capabilities)
        assert "predict_class" not in info.capabilities  # no fine-tuned head in this bundle
        assert (info.max_group_size, info.max_offset, info.max_ingest_items) == (100, 500, 1000)
    finally:
        running.stop(0)
