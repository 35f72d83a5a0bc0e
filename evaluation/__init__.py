"""Retrieval quality as a library: metrics over ranked relevance, the evaluation protocols (leave-one-out,
external queries, patient exclusion) and group k-fold cross-validation with fine-tuning per fold.

Training imports the metrics, ``cbmir eval`` the protocols; ``benchmarks/`` measures speed and scale only.
Heavy modules (the protocols and cross-validation need the extractors and the search engine) are imported from
their own submodules.
"""

from .metrics import average_precision_at_k, mean_precision_at_k, precision_at_k, seed_map

__all__ = ["average_precision_at_k", "mean_precision_at_k", "precision_at_k", "seed_map"]
