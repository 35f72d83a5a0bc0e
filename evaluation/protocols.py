"""Retrieval quality of a bundle: mP@1..10, the paper's mAP and standard AP@10, per method and relevance field.

Default protocol: every archive image queries the rest (leave-one-out; it never retrieves itself), optionally
also never retrieving images that share a group field with it (``exclude_same="patient_id"``). With an external
query set, its images are described by the bundle's own extractors. Searches go through
:class:`cbmir.server.search_engine.SearchEngine`, the code the service runs.
"""

from __future__ import annotations

import logging
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from cbmir.errors import InvalidInputError
from cbmir.index_build.archive import Archive
from cbmir.index_build.bundle import Bundle
from cbmir.server.query_expansion import QueryExpansion
from cbmir.server.reciprocal_rerank import ReciprocalRerank
from cbmir.server.search_engine import SearchEngine

from .metrics import average_precision_at_k, mean_precision_at_k, seed_map

log = logging.getLogger("cbmir.eval")
K = 10


@dataclass(frozen=True)
class MethodSpec:
    """One ranking evaluated: candidates by ``method``, optionally re-ranked by ``rerank``, query-expanded, or
    k-reciprocally re-ranked; class-predicted rankings may blend a neighbour vote into the head's prediction."""

    method: str
    rerank: str | None = None
    expansion: QueryExpansion | None = None
    reciprocal: ReciprocalRerank | None = None
    neighbour_vote: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        """The methods whose descriptors this ranking needs."""
        return (self.method,) if self.rerank is None else (self.method, self.rerank)

    def search_options(self) -> dict[str, Any]:
        """The keyword options of :meth:`SearchEngine.search` this ranking adds."""
        return {"expansion": self.expansion, "reciprocal": self.reciprocal}

    def class_options(self) -> dict[str, Any]:
        """The extra keyword options of :meth:`SearchEngine.search_predicted_class`."""
        return {"neighbour_vote": self.neighbour_vote}


def parse_method(spec: str) -> MethodSpec:
    """Parse ``NAME[+RERANK][:qeN][:krN][:voteN]``.

    ``cnn``: cnn's ranking; ``cnn+hog``: cnn's candidates re-ranked by hog; ``cnn:qe3``: cnn with alpha query
    expansion over each query's top 3 hits (alpha 3); ``cnn:kr20``: k-reciprocal re-ranking with k1 = 20;
    ``classpred:vote10``: the class is predicted from the head and the labels of the query's 10 nearest images.
    """
    ranking, *options = spec.split(":")
    expansion = reciprocal = None
    vote = 0
    for option in options:
        match = re.fullmatch(r"(qe|kr|vote)(\d+)", option)
        if match is None:
            raise InvalidInputError(
                f"method {spec!r}: options are :qeN (query expansion over N hits), :krN (k-reciprocal, k1 = N) and "
                ":voteN (classpred: N neighbours vote on the class)"
            )
        if match.group(1) == "qe":
            expansion = QueryExpansion(int(match.group(2)))
        elif match.group(1) == "kr":
            reciprocal = ReciprocalRerank(int(match.group(2)))
        else:
            vote = int(match.group(2))
    if vote and not ranking.startswith("classpred"):
        raise InvalidInputError(f"method {spec!r}: :voteN applies to classpred (class-predicted search) only")
    parts = ranking.split("+")
    if len(parts) > 2 or not all(parts):
        raise InvalidInputError(f"method {spec!r}: use NAME or NAME+RERANK_NAME, optionally followed by :qeN / :krN")
    if reciprocal is not None and len(parts) == 2:
        raise InvalidInputError(f"method {spec!r}: k-reciprocal re-ranking replaces +RERANK_NAME; use one")
    return MethodSpec(parts[0], parts[1] if len(parts) == 2 else None, expansion, reciprocal, vote)


def _codes(values: Sequence[str], vocabulary: dict[str, int]) -> np.ndarray:
    return np.array([vocabulary.setdefault(v, len(vocabulary)) if v != "" else -1 for v in values], dtype=np.int64)


def relevance_codes(
    archive_meta: dict[str, list[str]], query_meta: dict[str, list[str]], spec: str
) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes such that a hit is relevant iff its code equals the query's (and is >= 0).

    ``spec`` is a metadata field (``label``) or fields joined by ``&`` (``modality&body_region``), which must all
    match.
    """
    fields = spec.split("&")
    for f in fields:
        if f not in archive_meta:
            raise InvalidInputError(f"relevance field {f!r} is not in the bundle's metadata: {sorted(archive_meta)}")
        if f not in query_meta:
            raise InvalidInputError(f"relevance field {f!r} is missing from the query labels")

    def joined(meta: dict[str, list[str]]) -> list[str]:
        cols = [meta[f] for f in fields]
        return ["\x1f".join(vals) if all(vals) else "" for vals in zip(*cols)]

    vocab: dict[str, int] = {}
    return _codes(joined(archive_meta), vocab), _codes(joined(query_meta), vocab)


def score_rankings(
    rows: np.ndarray,
    archive_meta: dict[str, list[str]],
    query_meta: dict[str, list[str]],
    excluded: Sequence[np.ndarray],
    rel_spec: str,
) -> dict[str, Any]:
    """mP@1..K, the paper's mAP and standard AP@K of ranked archive rows, and the chance baseline.

    ``chance_P@k`` is the expected P@k (for every k, so also the expected seed mAP) of a random ranking: per query,
    the share of relevant items among the images it may retrieve, averaged over queries.

    Args:
        rows: (Q, K) archive rows per query, -1 for empty slots.
        archive_meta / query_meta: metadata columns of the archive and of the queries.
        excluded: per query, archive rows it may not retrieve (they do not count as relevant items either).
        rel_spec: relevance field(s), see :func:`relevance_codes`.
    """
    archive_codes, query_codes = relevance_codes(archive_meta, query_meta, rel_spec)
    hit_codes = np.where(rows >= 0, archive_codes[np.maximum(rows, 0)], -2)
    relevant = (hit_codes == query_codes[:, None]) & (query_codes[:, None] >= 0)
    counts = np.bincount(archive_codes[archive_codes >= 0], minlength=int(archive_codes.max()) + 1)
    n_relevant = np.array(
        [
            (counts[c] - np.count_nonzero(archive_codes[ex] == c)) if 0 <= c < len(counts) else 0
            for c, ex in zip(query_codes, excluded)
        ]
    )
    valid = query_codes >= 0
    ap = average_precision_at_k(relevant[valid], n_relevant[valid])
    candidates = np.array([len(archive_codes) - len(ex) for ex in excluded])
    chance = n_relevant[valid] / np.maximum(candidates[valid], 1)
    return {
        "queries": int(valid.sum()),
        "mP@k": [round(float(x), 6) for x in mean_precision_at_k(relevant[valid])],
        "seed_mAP": round(seed_map(relevant[valid]), 6),
        "AP@10": round(float(np.nanmean(ap)), 6) if np.isfinite(ap).any() else None,
        "queries_without_relevant": int(np.isnan(ap).sum()),
        "chance_P@k": round(float(chance.mean()), 6) if len(chance) else None,
    }


WORST_QUERIES = 12


def failure_report(
    rows: np.ndarray, bundle: Bundle, query_meta: dict[str, list[str]], query_ids: Sequence[str], rel_spec: str
) -> dict[str, Any]:
    """Where retrieval fails: P@1 and P@10 per class of the query, the confusion of the top-10 hits, and the
    queries with the lowest P@10.

    Returns:
        ``per_class`` {class: {queries, P@1, P@10}}, ``confusion`` {query class: {hit class: share of that class's
        top-10 hits}} (non-zero shares only, rows sum to 1) and ``worst`` [{id, class, P@10, hits: [{id, class}]}].
    """
    fields = rel_spec.split("&")
    classes = ["&".join(vals) for vals in zip(*(query_meta[f] for f in fields))]
    archive_classes = np.asarray(["&".join(vals) for vals in zip(*(bundle.metadata[f] for f in fields))], dtype=object)
    valid = rows >= 0
    hit_classes = np.where(valid, archive_classes[np.maximum(rows, 0)], None)
    query_classes = np.asarray(classes, dtype=object)
    relevant = (hit_classes == query_classes[:, None]) & valid
    p10 = relevant[:, :K].mean(axis=1)
    per_class = {}
    for c in sorted(set(classes)):
        members = query_classes == c
        per_class[c] = {
            "queries": int(members.sum()),
            "P@1": round(float(relevant[members, 0].mean()), 6),
            "P@10": round(float(p10[members].mean()), 6),
        }
    names, archive_codes = np.unique(archive_classes.astype(str), return_inverse=True)
    vocabulary = {c: i for i, c in enumerate(names.tolist())}
    query_codes = _codes(classes, vocabulary)
    size = len(vocabulary)
    hit_codes = archive_codes[np.maximum(rows, 0)]
    pairs = (query_codes[:, None] * size + hit_codes)[valid & (query_codes >= 0)[:, None]]
    counts = np.bincount(pairs, minlength=size * size).reshape(size, size)
    labels = list(vocabulary)
    confusion = {}
    for q_code in np.flatnonzero(counts.sum(axis=1)):
        row = counts[q_code]
        confusion[labels[q_code]] = {
            labels[h]: round(float(row[h] / row.sum()), 6) for h in np.argsort(-row, kind="stable") if row[h]
        }
    worst = []
    for i in np.argsort(p10, kind="stable")[:WORST_QUERIES]:
        hits = [{"id": bundle.ids[r], "class": str(archive_classes[r])} for r in rows[i] if r >= 0]
        worst.append({"id": query_ids[i], "class": classes[i], "P@10": round(float(p10[i]), 6), "hits": hits})
    return {"per_class": per_class, "confusion": confusion, "worst": worst}


def evaluate(
    bundle: Bundle,
    methods: Sequence[str],
    relevance: Sequence[str],
    *,
    queries: Archive | None = None,
    k_prep: int = 10,
    exclude_same: str | None = None,
    batch: int = 2048,
    device: str = "auto",
    runtime: str | None = None,
    precision: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the protocol and return the JSON-ready result document.

    ``runtime`` and ``precision`` describe external ``queries`` (default: as the bundle was indexed).
    """
    engine = SearchEngine(bundle, device=device, runtime=runtime, precision=precision)
    n = len(bundle)
    if exclude_same and exclude_same not in bundle.metadata:
        raise InvalidInputError(f"--exclude-same field {exclude_same!r} is not in the bundle's metadata")

    query_vectors: dict[str, np.ndarray] = {}
    describe_s: dict[str, float] = {}
    if queries is None:
        query_meta = bundle.metadata
        n_queries = n
        self_rows: np.ndarray | None = np.arange(n)
    else:
        records = [queries.load(i) for i in range(len(queries))]
        fields = sorted({k for r in records for k in r.metadata})
        query_meta = {f: [r.metadata.get(f, "") for r in records] for f in fields}
        n_queries = len(records)
        self_rows = None
        needed = {name for spec in methods for name in parse_method(spec).names}
        for name in sorted(needed):
            t0 = time.perf_counter()
            query_vectors[name] = engine.describe(name, [r.image for r in records])
            describe_s[name] = time.perf_counter() - t0

    query_ids = list(bundle.ids) if queries is None else [e.id for e in queries.entries]
    excluded: list[np.ndarray] = [np.zeros(0, np.int64)] * n_queries
    if exclude_same:
        groups: dict[str, np.ndarray] = {}
        column = np.asarray(bundle.metadata[exclude_same])
        for value in np.unique(column):
            if value != "":
                groups[value] = np.flatnonzero(column == value)
        q_column = query_meta.get(exclude_same, [""] * n_queries)
        excluded = [groups.get(v, np.zeros(0, np.int64)) for v in q_column]
    if self_rows is not None:
        excluded = [np.union1d(ex, [i]) for i, ex in enumerate(excluded)]

    results = []
    for spec in methods:
        parsed = parse_method(spec)
        method, rerank = parsed.method, parsed.rerank
        for checked in parsed.names:
            engine.method(checked)
        rows = np.empty((n_queries, K), dtype=np.int64)
        t0 = time.perf_counter()
        chunks = range(0, n_queries, batch)

        def vectors(name: str, start: int, stop: int) -> np.ndarray:
            if self_rows is not None:
                return bundle.methods[name].descriptors[start:stop]
            return query_vectors[name][start:stop]

        for start in tqdm(chunks, desc=f"eval {spec}", disable=not progress, leave=False):
            stop = min(start + batch, n_queries)
            result = engine.search(
                method,
                vectors(method, start, stop),
                K,
                exclude=excluded[start:stop],
                rerank=rerank,
                rerank_queries=vectors(rerank, start, stop) if rerank else None,
                k_prep=k_prep,
                **parsed.search_options(),
            )
            rows[start:stop] = result.rows
        search_s = time.perf_counter() - t0
        for rel_spec in relevance:
            scores = score_rankings(rows, bundle.metadata, query_meta, excluded, rel_spec)
            failures = failure_report(rows, bundle, query_meta, query_ids, rel_spec)
            results.append(
                {
                    "method": spec,
                    "relevance": rel_spec,
                    **scores,
                    **failures,
                    "search_s": round(search_s, 3),
                    "describe_s": round(sum(describe_s.get(m, 0.0) for m in (method, rerank) if m), 3),
                }
            )
            log.info("%s / %s: seed mAP %.4f", spec, rel_spec, results[-1]["seed_mAP"])
    return {
        "results": results,
        "config": {
            "bundle": str(bundle.path),
            "bundle_version": bundle.version,
            "archive_count": n,
            "protocol": "leave-one-out" if queries is None else "external queries",
            "queries_source": None if queries is None else queries.source,
            "exclude_same": exclude_same,
            "k": K,
            "k_prep": k_prep,
            "methods": {
                name: {
                    "extractor": m.extractor,
                    "config": m.config,
                    "metric": m.metric,
                    "dim": m.dim,
                    **{k: m.info[k] for k in ("images_per_s", "extract_s", "fit_s") if k in m.info},
                }
                for name, m in bundle.methods.items()
            },
            "build": bundle.manifest.get("build", {}),
            "platform": platform.platform(),
        },
    }


def evaluate_studies(
    bundle: Bundle,
    method: str,
    study_field: str,
    relevance: str = "label",
    *,
    fusions: Sequence[str] = ("rrf", "min"),
    device: str = "auto",
) -> dict[str, Any]:
    """Study queries against single images: each study (images sharing ``study_field`` and the ``relevance`` label,
    e.g. a patient's views of one body part) queries the archive minus its ``study_field`` group once with all its
    images (fused), and once per image; seed mAP is averaged over studies so both weigh each study alike.
    """
    from cbmir.server.fusion import fused_search

    engine = SearchEngine(bundle, device=device)
    descriptors = bundle.methods[method].descriptors
    for name in (study_field, relevance):
        if name not in bundle.metadata:
            raise InvalidInputError(f"field {name!r} is not in the bundle's metadata: {sorted(bundle.metadata)}")
    groups = np.asarray(bundle.metadata[study_field], dtype=object).astype(str)
    labels = np.asarray(bundle.metadata[relevance], dtype=object).astype(str)
    studies: dict[tuple[str, str], list[int]] = {}
    for row, (g, label) in enumerate(zip(groups, labels)):
        if g and label:
            studies.setdefault((g, label), []).append(row)
    studies = {key: rows for key, rows in studies.items() if len(rows) >= 2}
    if not studies:
        raise InvalidInputError(f"no study has two or more images sharing {study_field} and {relevance}")
    scores: dict[str, list[float]] = {"single image": [], **{f"study ({f})": [] for f in fusions}}
    for (group, label), rows in studies.items():
        excluded = np.flatnonzero(groups == group)
        single = engine.search(method, descriptors[rows], K, exclude=[excluded] * len(rows))
        scores["single image"].append(seed_map(_relevant(single.rows, labels, label)))
        for fusion in fusions:
            fused, _ = fused_search(engine, method, descriptors[rows], K, fusion, exclude=excluded)
            scores[f"study ({fusion})"].append(seed_map(_relevant(fused[None, :], labels, label)))
    return {
        "method": method,
        "study_field": study_field,
        "relevance": relevance,
        "studies": len(studies),
        "images": int(sum(len(r) for r in studies.values())),
        "seed_mAP": {name: round(float(np.mean(values)), 4) for name, values in scores.items()},
    }


def _relevant(rows: np.ndarray, labels: np.ndarray, label: str) -> np.ndarray:
    """(Q, K) relevance of ranked rows to ``label``; missing slots count as irrelevant."""
    padded = np.full((rows.shape[0], K), -1, np.int64)
    padded[:, : min(K, rows.shape[1])] = rows[:, :K]
    return np.where(padded >= 0, labels[np.maximum(padded, 0)] == label, False)
