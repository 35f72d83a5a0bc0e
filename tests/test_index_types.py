import faiss
import numpy as np
import pytest

from cbmir.errors import InvalidInputError
from cbmir.index_build import build_bundle, load_bundle, open_archive
from cbmir.index_build.index_types import build_index, choose_index_type
from cbmir.server.search_engine import SearchEngine


def clustered(n=3000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, d)).astype(np.float32)
    return (centres[rng.integers(0, 30, n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize(
    ("index_type", "metric"), [("ivf", "l2"), ("hnsw", "l2"), ("hnsw", "l1"), ("sq8", "cosine"), ("ivfpq", "l2")]
)
def test_approximate_indices_recall_against_flat(index_type, metric):
    x = clustered()
    if metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact, _ = build_index(x, metric, "flat")
    approx, params = build_index(x, metric, index_type)
    _, truth = exact.search(x[:200], 10)
    _, got = approx.search(x[:200], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)])
    assert recall >= (0.5 if index_type == "ivfpq" else 0.9), (index_type, params, recall)


def test_unsupported_combinations_and_auto_policy():
    with pytest.raises(InvalidInputError, match="L1"):
        build_index(clustered(500), "l1", "sq8")
    with pytest.raises(InvalidInputError, match="unknown index type"):
        build_index(clustered(500), "l2", "lsh")
    assert choose_index_type(50_000, "l2") == "flat" and choose_index_type(2_000_000, "l2") == "ivf"


def test_hnsw_bundle_round_trip_and_exact_filters(unifesp_subset, tmp_path):
    root, labels = unifesp_subset
    report = build_bundle(
        open_archive(root, labels), tmp_path / "b", {"hog": {}}, device="cpu", progress=False, index_type="hnsw"
    )
    bundle = load_bundle(tmp_path / "b")
    assert bundle.methods["hog"].index_type == "hnsw" and (report.path / "hog.faiss").is_file()
    assert bundle.manifest["methods"]["hog"]["index_params"]["efSearch"] > 0
    engine = SearchEngine(bundle, device="cpu")
    d = bundle.methods["hog"].descriptors
    res = engine.search("hog", d[:5], 5)
    assert (res.rows[:, 0] == np.arange(5)).all()
    labels_col = np.asarray(bundle.metadata["label"])
    patients = np.asarray(bundle.metadata["patient_id"])
    knee = np.flatnonzero(labels_col == "Knee")
    allowed = (labels_col == "Knee") & (patients == patients[knee[0]])
    res = engine.search("hog", d[:1], 10, allowed=allowed)
    assert sorted(res.rows[0][res.rows[0] >= 0]) == sorted(np.flatnonzero(allowed))


def test_itq_coarse_to_fine_returns_exact_float_distances():
    x = clustered(4000, 64)
    exact, _ = build_index(x, "l2", "flat")
    itq, params = build_index(x, "l2", "itq", {"bits": 32, "k_factor": 20})
    assert params == {"bits": 32, "k_factor": 20}
    true_d, truth = exact.search(x[:200], 10)
    got_d, got = itq.search(x[:200], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)])
    assert recall >= 0.8, recall
    recomputed = np.square(x[got] - x[:200, None, :]).sum(-1)
    np.testing.assert_allclose(got_d, recomputed, rtol=1e-4, atol=1e-3)
    loose, _ = build_index(x, "l2", "itq", {"bits": 32, "k_factor": 1})
    _, coarse_only = loose.search(x[:200], 10)
    assert recall > np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, coarse_only)])
    with pytest.raises(InvalidInputError, match="bits"):
        build_index(x, "l2", "itq", {"bits": 128})
    for metric in ("l1", "cosine"):
        with pytest.raises(InvalidInputError, match="itq"):
            build_index(x, metric, "itq")


EMPTY_FILTER = {"label": ["no-such-label"]}


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "sq8", "ivfpq", "itq"])
def test_a_filter_matching_nothing_gives_zero_hits_on_every_index_type(small_bundle, index_type):
    """Every query kind the engine serves: plain, excluded (archive id), re-ranked, batched."""
    bundle = load_bundle(small_bundle)
    cnn = bundle.methods["cnn"]
    if index_type == "ivfpq":  # 90 vectors are too few to train 8-bit PQ codes: train on jittered copies
        rng = np.random.default_rng(0)
        training = np.repeat(cnn.descriptors, 40, axis=0)
        training += 0.01 * rng.standard_normal(training.shape).astype(np.float32)
        cnn.index = faiss.index_factory(cnn.dim, "IVF2,PQ8")
        cnn.index.train(training)
        cnn.index.add(cnn.descriptors)
    elif index_type != "flat":
        cnn.index, _ = build_index(cnn.descriptors, "l2", index_type, {"nlist": 2, "bits": 64})
    cnn.index_type = index_type
    engine = SearchEngine(bundle, device="cpu")
    allowed = engine.allowed_rows(EMPTY_FILTER)
    assert allowed is not None and not allowed.mask.any()
    q, hog_q = cnn.descriptors[:3], bundle.methods["hog"].descriptors[:3]
    results = [
        engine.search("cnn", q, 5, allowed=allowed),
        engine.search("cnn", q, 5, allowed=allowed, exclude=[np.array([0]), np.array([1]), np.array([2])]),
        engine.search("cnn", q, 5, allowed=allowed, rerank="hog", rerank_queries=hog_q, k_prep=20),
    ]
    for res in results:
        assert res.rows.shape == (3, 5) and (res.rows == -1).all() and np.isinf(res.distances).all()


def test_a_filter_matching_nothing_over_grpc_on_an_approximate_index(unifesp_subset, tmp_path):
    from cbmir.client import RetrievalClient, build_request
    from cbmir.server.config import ServerConfig
    from cbmir.server.startup import start_server
    from tests.helpers import real_png

    root, labels = unifesp_subset
    build_bundle(
        open_archive(root, labels), tmp_path / "b", {"hog": {}}, device="cpu", progress=False, index_type="hnsw"
    )
    running = start_server(ServerConfig(index=str(tmp_path / "b"), port=0, device="cpu"), wait_ready=True)
    try:
        with RetrievalClient(f"127.0.0.1:{running.port}") as client:
            first = load_bundle(tmp_path / "b").ids[0]
            filters = {"label": "no-such-label"}
            assert client.search_image(real_png(0), k=5, method="hog", filters=filters) == []
            assert client.search_id(first, k=5, method="hog", filters=filters) == []
            assert client.search_id(first, k=5, method="hog", rerank="hog", k_prep=20, filters=filters) == []
            batch = [
                build_request(archive_id=first, k=3, method="hog", filters=filters),
                build_request(image=real_png(1), k=3, method="hog", filters=filters),
            ]
            assert client.search_batch(batch) == [[], []]
    finally:
        running.stop(0)
