import faiss
import numpy as np
import pytest

from cbmir.server.rerank import candidate_distances


@pytest.mark.parametrize(("metric", "faiss_metric"), [("l1", faiss.METRIC_L1), ("l2", faiss.METRIC_L2)])
def test_candidate_distances_match_faiss_pairwise(metric, faiss_metric):
    rng = np.random.default_rng(0)
    archive = rng.random((500, 540), dtype=np.float32)
    queries = rng.random((7, 540), dtype=np.float32)
    candidates = rng.integers(0, 500, size=(7, 25))
    ours = candidate_distances(queries, archive, candidates, metric)
    full = faiss.pairwise_distances(queries, archive, faiss_metric)
    if metric == "l2":
        full = np.sqrt(full)
    np.testing.assert_allclose(ours, np.take_along_axis(full, candidates, axis=1), rtol=1e-5)


def test_cosine_distance_and_empty_slots():
    rng = np.random.default_rng(1)
    archive = rng.standard_normal((50, 16)).astype(np.float32)
    archive /= np.linalg.norm(archive, axis=1, keepdims=True)
    queries = archive[:3].copy()
    candidates = np.array([[0, 5, -1], [1, -1, -1], [2, 3, 4]])
    d = candidate_distances(queries, archive, candidates, "cosine")
    assert d[0, 0] == pytest.approx(0.0, abs=1e-6) and d[2, 0] == pytest.approx(0.0, abs=1e-6)
    assert np.isinf(d[0, 2]) and np.isinf(d[1, 1:]).all()
    assert d[2, 1] == pytest.approx(1.0 - float(archive[2] @ archive[3]), abs=1e-6)
