"""Study queries: several images of one study searched at once, fused by minimum distance or reciprocal rank."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from cbmir.client import RetrievalClient
from cbmir.evaluation.protocols import evaluate_studies
from cbmir.index_build import load_bundle
from cbmir.server.config import ServerConfig
from cbmir.server.fusion import RRF_K, fused_search
from cbmir.server.search_engine import SearchEngine
from tests.helpers import UNIFESP


@pytest.fixture(scope="module")
def engine(small_bundle: Path) -> SearchEngine:
    return SearchEngine(load_bundle(small_bundle), device="cpu")


def test_min_and_rrf_fusion_equal_hand_computed_rankings(engine: SearchEngine) -> None:
    bundle = engine.bundle
    hog = bundle.methods["hog"].descriptors
    study = [0, 1, 2]
    excluded = np.array(study)
    full = engine.search("hog", hog[study], len(bundle), exclude=[excluded] * 3)
    best: dict[int, float] = {}
    for rows, dists in zip(full.rows, full.distances):
        for r, d in zip(rows.tolist(), dists.tolist()):
            if r >= 0:
                best[r] = min(best.get(r, np.inf), d)
    expected = sorted(best, key=lambda r: (best[r], r))[:7]
    rows, dists = fused_search(engine, "hog", hog[study], 7, "min", exclude=excluded)
    assert rows.tolist() == expected
    np.testing.assert_allclose(dists, [best[r] for r in expected], rtol=1e-6)
    depth = 50
    score: dict[int, float] = {}
    for ranked in full.rows[:, :depth]:
        for rank, r in enumerate(ranked.tolist(), start=1):
            score[r] = score.get(r, 0.0) + 1.0 / (RRF_K + rank)
    expected_rrf = sorted(score, key=lambda r: (-score[r], best[r], r))[:7]
    assert fused_search(engine, "hog", hog[study], 7, "rrf", exclude=excluded)[0].tolist() == expected_rrf


def test_study_query_over_grpc_and_its_refusals(small_bundle: Path, engine: SearchEngine) -> None:
    from cbmir.server.startup import start_server

    bundle = engine.bundle
    images = [(UNIFESP / i).read_bytes() for i in bundle.ids[:2]]
    running = start_server(ServerConfig(index=str(small_bundle), port=0, device="cpu"), wait_ready=True)
    try:
        client = RetrievalClient(f"127.0.0.1:{running.port}")
        hits = client.search_study(images, k=6, method="hog", exclude_ids=bundle.ids[:2])
        vectors = engine.describe("hog", [engine.decode(d) for d in images])
        rows, dists = fused_search(engine, "hog", vectors, 6, "min", exclude=np.array([0, 1]))
        assert [h.id for h in hits] == [bundle.ids[r] for r in rows]
        np.testing.assert_allclose([h.distance for h in hits], dists, rtol=1e-4)
        assert [h.rank for h in hits] == list(range(1, 7))
        rrf = client.search_study(images, k=6, method="hog", fusion="rrf")
        assert len(rrf) == 6
        for kwargs, message in (
            ({"fusion": "avg"}, "fusion must be one of"),
            ({"rerank": "cnn"}, "study queries take"),
            ({"group_by": "patient_id"}, "study queries take"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                client.search_study(images, k=3, method="hog", **kwargs)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.search_study(images * 17, k=3, method="hog")
        assert "exceed the limit of 32" in err.value.details()
    finally:
        running.stop(0)


def test_study_evaluation_scores_single_images_and_fused_studies(engine: SearchEngine) -> None:
    bundle = engine.bundle
    doc = evaluate_studies(bundle, "hog", "patient_id", "label", device="cpu")
    patients = np.asarray(bundle.metadata["patient_id"])
    labels = np.asarray(bundle.metadata["label"])
    studies = {(p, lab) for p, lab in zip(patients, labels) if ((patients == p) & (labels == lab)).sum() >= 2}
    assert doc["studies"] == len(studies) and set(doc["seed_mAP"]) == {"single image", "study (rrf)", "study (min)"}
    assert all(0.0 <= v <= 1.0 for v in doc["seed_mAP"].values())
