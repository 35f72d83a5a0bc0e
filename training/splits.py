"""Splits that never put one group (patient) on both sides."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cbmir.errors import InvalidInputError


def group_codes(groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Integer group per sample and the size of each group; a sample with an empty group is a group of its own."""
    values = np.asarray([str(g) if str(g) != "" else f"\x00{i}" for i, g in enumerate(groups)], dtype=object)
    uniques, codes = np.unique(values.astype(str), return_inverse=True)
    return codes, np.bincount(codes, minlength=len(uniques))


def group_kfold(groups: Sequence[str], n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..n_folds-1) per sample, balancing fold sizes; a group never spans two folds.

    Groups are shuffled with ``seed`` and then assigned, largest first, to the currently smallest fold.

    Args:
        groups: (N,) group value per sample (patient id); ``""`` makes a sample its own group.
        n_folds: number of folds, at least 2 and at most the number of groups.
        seed: shuffling seed (ties between equal-sized groups).

    Returns:
        (N,) int64 fold per sample.
    """
    codes, sizes = group_codes(groups)
    if n_folds < 2 or n_folds > len(sizes):
        raise InvalidInputError(f"need 2 <= folds <= number of groups ({len(sizes)}), got {n_folds}")
    order = np.random.default_rng(seed).permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_group = np.empty(len(sizes), dtype=np.int64)
    load = np.zeros(n_folds, dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))
        fold_of_group[g] = f
        load[f] += sizes[g]
    return fold_of_group[codes]


def group_split(groups: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation sample indices; about ``val_fraction`` of the samples, whole groups only, go to val.

    Returns:
        (train indices, val indices), both sorted int64; val is empty when ``val_fraction`` is 0.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    codes, sizes = group_codes(groups)
    n = len(codes)
    if val_fraction == 0.0 or n == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(sizes))
    taken = np.cumsum(sizes[order])
    n_val_groups = max(1, int(np.searchsorted(taken, val_fraction * n)) + 1)
    if n_val_groups >= len(sizes):
        raise InvalidInputError(f"val_fraction {val_fraction} leaves no group for training ({len(sizes)} groups)")
    is_val = np.isin(codes, order[:n_val_groups])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
