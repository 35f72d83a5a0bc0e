import faiss
import numpy as np
import pytest

from cbmir.errors import InvalidInputError
from cbmir.index_build import load_bundle
from cbmir.server.search_engine import SearchEngine


@pytest.fixture(scope="module")
def engine(small_bundle):
    return SearchEngine(load_bundle(small_bundle), device="cpu")


def brute_force(engine, method, q, rows):
    info = engine.method(method)
    metric = {"l2": faiss.METRIC_L2, "l1": faiss.METRIC_L1, "cosine": faiss.METRIC_INNER_PRODUCT}[info.metric]
    d = faiss.pairwise_distances(q, info.descriptors[rows], metric)
    if info.metric == "l2":
        d = np.sqrt(np.maximum(d, 0))
    elif info.metric == "cosine":
        d = 1 - d
    return d


@pytest.mark.parametrize("method", ["cnn", "hog", "bovw"])
def test_search_equals_brute_force(engine, method):
    q = engine.method(method).descriptors[:4]
    res = engine.search(method, q, 10)
    full = brute_force(engine, method, q, np.arange(len(engine.bundle)))
    expected_d = np.sort(full, axis=1)[:, :10]
    atol = 2e-3 if method == "cnn" else 1e-4  # sqrt of a squared self-distance of ~1e-7 is ~3e-4
    np.testing.assert_allclose(res.distances, expected_d, atol=atol)
    np.testing.assert_allclose(np.take_along_axis(full, res.rows, axis=1), res.distances, atol=atol)


def test_filter_is_exact_even_when_it_matches_few_images(engine):
    bundle = engine.bundle
    knee_rows = np.flatnonzero(np.asarray(bundle.metadata["label"]) == "Knee")
    one_patient = bundle.metadata["patient_id"][knee_rows[0]]
    allowed = engine.allowed_rows({"label": ["Knee"], "patient_id": [one_patient]})
    expected_rows = np.flatnonzero(allowed.mask)
    assert 1 <= len(expected_rows) < 10
    q = engine.method("cnn").descriptors[knee_rows[-1:]]
    res = engine.search("cnn", q, 10, allowed=allowed)
    got = res.rows[0][res.rows[0] >= 0]
    assert sorted(got) == sorted(expected_rows)
    assert np.isinf(res.distances[0, len(got) :]).all()
    # A filter matching many images still returns k hits, all matching, in exact order.
    chest = engine.allowed_rows({"label": ["Chest", "Abdomen"]})
    res = engine.search("hog", engine.method("hog").descriptors[:3], 20, allowed=chest)
    assert (res.rows >= 0).all() and chest.mask[res.rows].all()
    d = brute_force(engine, "hog", engine.method("hog").descriptors[:3], np.flatnonzero(chest.mask))
    np.testing.assert_allclose(res.distances, np.sort(d, axis=1)[:, :20], atol=1e-4)


def test_filter_errors(engine):
    with pytest.raises(InvalidInputError, match="unknown filter field"):
        engine.allowed_rows({"colour": ["red"]})
    assert not engine.allowed_rows({"label": ["NoSuchLabel"]}).mask.any()


def test_exclusions_and_rerank(engine):
    d = engine.method("cnn").descriptors
    res = engine.search("cnn", d[:5], 5, exclude=[np.array([i]) for i in range(5)])
    assert all(i not in res.rows[i] for i in range(5))
    plain = engine.search("cnn", d[:5], 20, exclude=[np.array([i]) for i in range(5)])
    rr = engine.search(
        "cnn",
        d[:5],
        5,
        exclude=[np.array([i]) for i in range(5)],
        rerank="hog",
        rerank_queries=engine.method("hog").descriptors[:5],
        k_prep=20,
    )
    for i in range(5):
        cand = plain.rows[i]
        hog_d = np.abs(engine.method("hog").descriptors[cand] - engine.method("hog").descriptors[i]).sum(1)
        order = np.argsort(hog_d, kind="stable")[:5]
        np.testing.assert_array_equal(rr.rows[i], cand[order])
        np.testing.assert_allclose(rr.distances[i], hog_d[order], rtol=1e-5)


def test_bad_queries(engine):
    with pytest.raises(InvalidInputError, match="1280-dimensional"):
        engine.search("cnn", np.zeros((1, 10), np.float32), 5)
    with pytest.raises(InvalidInputError, match="NaN"):
        engine.search("cnn", np.full((1, 1280), np.nan, np.float32), 5)
    with pytest.raises(InvalidInputError, match="unknown method"):
        engine.search("sift", np.zeros((1, 10), np.float32), 5)
    with pytest.raises(InvalidInputError, match="k must be"):
        engine.search("cnn", np.zeros((1, 1280), np.float32), 0)
    res = engine.search("hog", engine.method("hog").descriptors[:1], 500)
    assert (res.rows[0] >= 0).sum() == len(engine.bundle)
