import numpy as np
import pytest

from cbmir.evaluation.metrics import average_precision_at_k, mean_precision_at_k, precision_at_k, seed_map


def test_precision_at_k_on_hand_made_ranking():
    rel = np.array([[1, 0, 1, 0]], dtype=bool)
    np.testing.assert_allclose(precision_at_k(rel)[0], [1.0, 0.5, 2 / 3, 0.5])


def test_mean_precision_and_seed_map_average_over_queries():
    rel = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
    # query 0: P@k = 1, 1, 2/3; query 1: 0, 0, 1/3
    np.testing.assert_allclose(mean_precision_at_k(rel), [0.5, 0.5, 0.5])
    assert seed_map(rel) == pytest.approx(((1 + 1 + 2 / 3) / 3 + (0 + 0 + 1 / 3) / 3) / 2)


def test_standard_average_precision_uses_min_of_relevant_and_k():
    rel = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    ap = average_precision_at_k(rel, np.array([2, 10, 0]))
    assert ap[0] == pytest.approx((1.0 + 2 / 3) / 2)  # two relevant exist, both found
    assert ap[1] == pytest.approx(0.5 / 4)  # ten relevant exist, only one found at rank 2, K = 4
    assert np.isnan(ap[2])  # nothing relevant in the archive: undefined, excluded from the mean


def test_perfect_ranking_scores_one_everywhere():
    rel = np.ones((5, 10), dtype=bool)
    assert seed_map(rel) == 1.0
    np.testing.assert_allclose(average_precision_at_k(rel, np.full(5, 50)), 1.0)
