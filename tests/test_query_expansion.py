from pathlib import Path

import numpy as np
import pytest

from cbmir.errors import InvalidInputError
from cbmir.evaluation.cross_validation import _method_index
from cbmir.evaluation.protocols import parse_method
from cbmir.index_build.bundle import Bundle
from cbmir.index_build.records import Records
from cbmir.server.query_expansion import QueryExpansion, expand_queries
from cbmir.server.search_engine import SearchEngine


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def engine_over(vectors: np.ndarray, metric: str) -> SearchEngine:
    n = len(vectors)
    method = _method_index("m", "hog", vectors, metric)
    ids = [f"img-{i}" for i in range(n)]
    bundle = Bundle(Path("expansion-test"), {}, Records.from_columns(ids, ids, {"label": ["a"] * n}), {"m": method})
    return SearchEngine(bundle, device="cpu")


def test_cosine_expansion_weights_by_similarity_and_stays_unit_length():
    rng = np.random.default_rng(0)
    q = unit_rows(rng, 2, 8)
    near, far = q + 0.1 * unit_rows(rng, 2, 8), -q
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    neighbours = np.stack([near, far], axis=1)
    dist = np.linalg.norm(neighbours - q[:, None, :], axis=2)
    valid = np.array([[True, True], [True, False]])
    out = expand_queries(q, neighbours, dist, valid, "l2", alpha=3.0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    cos = 1.0 - dist[:, 0] ** 2 / 2
    expected = q + cos[:, None] ** 3 * near  # the opposite vector has similarity <= 0: weight 0
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_non_unit_descriptors_get_the_plain_mean_of_valid_neighbours():
    q = np.array([[1.0, 2.0, 3.0]], np.float32)
    neighbours = np.array([[[3.0, 2.0, 1.0], [5.0, 5.0, 5.0], [100.0, 100.0, 100.0]]], np.float32)
    valid = np.array([[True, True, False]])
    out = expand_queries(q, neighbours, np.array([[1.0, 2.0, np.inf]]), valid, "l1", alpha=3.0)
    np.testing.assert_allclose(out, [[3.0, 3.0, 3.0]])


def test_engine_expansion_uses_only_allowed_hits_and_equals_a_manual_two_pass_search():
    rng = np.random.default_rng(1)
    vectors = unit_rows(rng, 300, 16)
    engine = engine_over(vectors, "l2")
    q = vectors[:4] + 0.05 * unit_rows(rng, 4, 16)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exclude = [np.array([i]) for i in range(4)]  # each query's own source never enters the expansion
    got = engine.search("m", q, 5, exclude=exclude, expansion=QueryExpansion(3))
    first = engine.search("m", q, 3, exclude=exclude)
    assert not np.isin(first.rows, np.arange(4)[:, None]).any(axis=1).all()
    cos = 1.0 - first.distances**2 / 2
    manual = q + np.einsum("qn,qnd->qd", np.clip(cos, 0, 1) ** 3, vectors[first.rows])
    manual /= np.linalg.norm(manual, axis=1, keepdims=True)
    expected = engine.search("m", manual.astype(np.float32), 5, exclude=exclude)
    np.testing.assert_array_equal(got.rows, expected.rows)
    np.testing.assert_allclose(got.distances, expected.distances, rtol=1e-5, atol=1e-6)
    for i in range(4):
        assert i not in got.rows[i]


def test_expansion_limits_and_eval_spec():
    with pytest.raises(InvalidInputError, match="1..50"):
        QueryExpansion(0)
    with pytest.raises(InvalidInputError, match="alpha"):
        QueryExpansion(3, float("nan"))
    spec = parse_method("cnn+hog:qe5")
    assert (spec.method, spec.rerank, spec.expansion) == ("cnn", "hog", QueryExpansion(5))
    assert spec.names == ("cnn", "hog")
    assert parse_method("classpred:vote10").class_options() == {"neighbour_vote": 10}
    assert parse_method("cnn:qe2").class_options() == {"neighbour_vote": 0}
    for bad in ("cnn:qe", "cnn:xx3", "cnn+", "a+b+c", "cnn:vote5"):
        with pytest.raises(InvalidInputError, match=bad.replace("+", r"\+")):
            parse_method(bad)
