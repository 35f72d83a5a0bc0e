from pathlib import Path

import numpy as np
import pytest

from cbmir.errors import InvalidInputError
from cbmir.evaluation.cross_validation import _method_index
from cbmir.evaluation.protocols import parse_method
from cbmir.index_build.bundle import Bundle
from cbmir.index_build.records import Records
from cbmir.server.reciprocal_rerank import ReciprocalRerank, reciprocal_distances
from cbmir.server.search_engine import SearchEngine


def reference(cand, dist, neigh, ndist, k1, blend):
    """The same definition written pair by pair with dictionaries."""
    out = np.full(cand.shape, np.inf)
    for qi in range(cand.shape[0]):
        valid = [j for j in range(cand.shape[1]) if cand[qi, j] >= 0]
        s = float(np.median([d for g, d in zip(neigh[qi].ravel(), ndist[qi].ravel()) if g >= 0 and d > 0]))
        vq = {}
        for j in valid[:k1]:
            if dist[qi, j] <= ndist[qi, j, k1 - 1]:
                vq[int(cand[qi, j])] = np.exp(-dist[qi, j] / s)
        scale = max(dist[qi, j] for j in valid)
        for j in valid:
            vc = {int(g): np.exp(-d / s) for g, d in zip(neigh[qi, j], ndist[qi, j]) if g >= 0}
            keys = set(vq) | set(vc)
            inter = sum(min(vq.get(g, 0.0), vc.get(g, 0.0)) for g in keys)
            union = sum(max(vq.get(g, 0.0), vc.get(g, 0.0)) for g in keys)
            out[qi, j] = (1 - blend) * (1 - inter / union) + blend * dist[qi, j] / scale
    return out


def engine_over(vectors: np.ndarray) -> SearchEngine:
    ids = [f"img-{i}" for i in range(len(vectors))]
    records = Records.from_columns(ids, ids, {"label": ["a"] * len(vectors)})
    return SearchEngine(
        Bundle(Path("kr-test"), {}, records, {"m": _method_index("m", "hog", vectors, "l2")}), device="cpu"
    )


def test_vectorised_distances_equal_the_pairwise_definition():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((120, 6)).astype(np.float32)
    engine = engine_over(vectors)
    queries = rng.standard_normal((5, 6)).astype(np.float32)
    k1 = 8
    found = engine.search("m", queries, 12)
    found.rows[1, 10:] = -1  # a query with fewer candidates than asked
    found.distances[1, 10:] = np.inf
    around = engine.search("m", vectors[np.maximum(found.rows, 0)].reshape(-1, 6), k1)
    neigh = around.rows.reshape(5, 12, k1)
    ndist = around.distances.reshape(5, 12, k1)
    got = reciprocal_distances(found.rows, found.distances, neigh, ndist, k1, 0.3)
    want = reference(found.rows, found.distances, neigh, ndist, k1, 0.3)
    valid = found.rows >= 0
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-6)
    assert np.isinf(got[~valid]).all()


def test_engine_reorders_only_its_candidates_and_blend_one_keeps_the_plain_order():
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((400, 8)).astype(np.float32)
    engine = engine_over(vectors)
    queries = vectors[:6] + 0.3 * rng.standard_normal((6, 8)).astype(np.float32)
    exclude = [np.array([i]) for i in range(6)]
    pool = engine.search("m", queries, 20, exclude=exclude)
    got = engine.search("m", queries, 10, exclude=exclude, reciprocal=ReciprocalRerank(20))
    for i in range(6):
        assert set(got.rows[i]) <= set(pool.rows[i]) and i not in got.rows[i]
    assert (np.diff(got.distances, axis=1) >= 0).all()
    assert not np.array_equal(got.rows, pool.rows[:, :10]), "re-ranking changed nothing"
    plain = engine.search("m", queries, 10, exclude=exclude, reciprocal=ReciprocalRerank(20, blend=1.0))
    np.testing.assert_array_equal(plain.rows, pool.rows[:, :10])


def test_limits_and_combinations_are_refused_clearly():
    with pytest.raises(InvalidInputError, match="k1"):
        ReciprocalRerank(1)
    with pytest.raises(InvalidInputError, match="lambda"):
        ReciprocalRerank(20, blend=1.5)
    engine = engine_over(np.eye(4, dtype=np.float32))
    with pytest.raises(InvalidInputError, match="replaces rerank"):
        engine.search(
            "m",
            np.eye(4, dtype=np.float32)[:1],
            2,
            rerank="m",
            rerank_queries=np.eye(4)[:1],
            reciprocal=ReciprocalRerank(3),
        )
    spec = parse_method("cnn:qe2:kr15")
    assert spec.reciprocal == ReciprocalRerank(15) and spec.expansion is not None
    with pytest.raises(InvalidInputError, match="replaces"):
        parse_method("cnn+hog:kr20")
