"""Group k-fold cross-validation of pretrained and fine-tuned descriptors on a labelled archive.

For each fold: fine-tune on the other folds (their own patient-grouped validation split drives early stopping),
describe the whole archive, and let every held-out image query the whole archive minus its own group (patient)
and itself. Rankings of all folds are pooled and scored like ``cbmir eval``. Methods that learn nothing from labels
(pretrained ``cnn``, ``hog``, ``bovw``) are described once and ranked under the same protocol, so every row of the
table is measured on the same queries and exclusions.

Methods: ``cnn`` (the pretrained backbone as ``cbmir build`` configures it by default: site-whitened to 128 dims when
the archive is large enough), ``hog``, ``bovw``, ``finetuned`` (the fold's fine-tuned backbone, projected like
``cnn``; the whitening is learned without labels), ``multiscale`` (fine-tuned backbone,
pooled stages concatenated, PCA), ``hashing`` (ITQ binary codes, Hamming candidates, exact float re-rank, over the
fine-tuned descriptors), ``classpred`` (search within the class the fine-tuned head predicts, whole archive when
unsure), and ``A+B`` (A's candidates re-ranked by B).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from cbmir.checksums import sha256_file
from cbmir.defaults import DEFAULT_PROJECTION_DIM, SITE_WHITEN_AUTO
from cbmir.errors import InvalidInputError
from cbmir.extractors import create_extractor
from cbmir.extractors.cnn import CNNExtractor
from cbmir.index_build.bundle import Bundle, MethodIndex, flat_index
from cbmir.index_build.index_types import build_index
from cbmir.index_build.records import Records
from cbmir.server.search_engine import SearchEngine
from cbmir.training import TrainConfig
from cbmir.training.dataset import LabelledImages, balanced_subsample
from cbmir.training.splits import group_codes, group_kfold
from cbmir.training.trainer import save_checkpoint, train_extractor

from .protocols import K, parse_method, score_rankings
from .site_shift import reexport_images, shift_scores

log = logging.getLogger("cbmir.cv")

FIXED = ("cnn", "hog", "bovw")
LEARNED = ("finetuned", "multiscale", "hashing", "classpred")


def _fold_identity(
    fold: int, folds: int, label_field: str, train_ids: Sequence[str], config: TrainConfig, start_weights: str
) -> dict[str, Any]:
    """What decides a fold's fine-tuned model: its configuration, its training images and its start weights
    (``start_weights``: the weights file's sha256, or the name of packaged weights)."""
    return {
        "fold": fold,
        "folds": folds,
        "label_field": label_field,
        "train_ids_sha256": hashlib.sha256("\n".join(train_ids).encode()).hexdigest(),
        "start_weights_sha256": start_weights,
        "config": asdict(config),
    }


def _without_weights_path(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """The identity with the start weights known by content only, so ``bundles/x.pt`` and ``/abs/bundles/x.pt``
    (or a copy elsewhere) name the same training, and settings added since a model was saved at their defaults."""
    if identity is None:
        return None
    config = {**asdict(TrainConfig()), **identity.get("config", {})}
    return {**identity, "config": {k: v for k, v in config.items() if k != "weights"}}


def _load_fold_model(
    path: Path, identity: dict[str, Any], config: TrainConfig, device: str, runtime: str, precision: str
) -> CNNExtractor | None:
    """The fold's saved fine-tuned extractor, or None when there is none or it was trained otherwise."""
    if not path.is_file():
        return None
    extractor = _checkpoint_extractor(path, config, device, runtime, precision)
    if _without_weights_path((extractor.training or {}).get("cross_validation")) != _without_weights_path(identity):
        log.info("%s was trained with another configuration or split: training again", path)
        return None
    log.info("fold model reused from %s", path)
    return extractor


def _checkpoint_extractor(
    path: Path, config: TrainConfig, device: str, runtime: str, precision: str, **options: Any
) -> CNNExtractor:
    """A cnn extractor with a fine-tuned checkpoint's weights (and head), at its training size and intensity."""
    extractor = CNNExtractor(
        model=config.model,
        weights=str(path),
        image_size=config.image_size,
        intensity=config.intensity,
        device=device,
        runtime=runtime,
        precision=precision,
        **options,
    )
    extractor.load_pretrained()
    return extractor


def _method_index(
    name: str,
    extractor: str,
    descriptors: np.ndarray,
    metric: str,
    index_type: str = "flat",
    params: dict[str, Any] | None = None,
) -> MethodIndex:
    if index_type == "flat":
        index, view = flat_index(descriptors, metric)
    else:
        index, params = build_index(descriptors, metric, index_type, params)
        view = np.ascontiguousarray(descriptors, dtype=np.float32)
    return MethodIndex(
        name, extractor, {}, metric, descriptors.shape[1], index_type, index, view, {}, {"index_params": params or {}}
    )


def _extract(extractor: Any, images: Sequence[np.ndarray], batch: int = 256) -> np.ndarray:
    """(N, D_raw) raw descriptors, extracted in batches."""
    return np.concatenate([extractor.extract(images[s : s + batch]) for s in range(0, len(images), batch)])


def _describe(extractor: Any, images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, D) descriptors of the archive's images; archive-wide statistics (IDF, PCA) are fitted on them."""
    raw = _extract(extractor, images)
    extractor.fit_archive(raw)
    return extractor.transform(raw)


def _search_ms(index: Any, queries: np.ndarray, repeats: int = 3) -> float:
    """Median wall time per query (ms) of a batched top-K search on one thread."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            index.search(queries, K)
            times.append((time.perf_counter() - t0) * 1000 / len(queries))
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.median(times))


def _rank(
    engine: SearchEngine,
    spec: str,
    queries: Mapping[str, np.ndarray],
    probabilities: np.ndarray | None,
    exclude: Sequence[np.ndarray],
    *,
    k_prep: int,
    min_confidence: float,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(Q, K) archive rows of one ranking, and the predicted class per query for class-predicted search.

    Args:
        queries: (Q, D) query descriptors per method name the ranking needs.
        probabilities: (Q, C) head probabilities; given, ``classpred`` searches within the predicted class.
    """
    parsed = parse_method(spec)
    method, rerank = parsed.method, parsed.rerank
    options: dict[str, Any] = {
        "exclude": exclude,
        "rerank": rerank,
        "rerank_queries": queries[rerank] if rerank else None,
        "k_prep": k_prep,
        **parsed.search_options(),
    }
    if method == "classpred" and probabilities is not None:
        result, predicted = engine.search_predicted_class(
            method,
            queries[method],
            probabilities,
            K,
            min_confidence=min_confidence,
            **options,
            **parsed.class_options(),
        )
        return result.rows, predicted
    return engine.search(method, queries[method], K, **options).rows, None


def cross_validate(
    data: LabelledImages,
    *,
    label_field: str,
    relevance: Sequence[str],
    methods: Sequence[str],
    group_field: str | None = None,
    folds: int = 5,
    seed: int = 0,
    train_config: TrainConfig | None = None,
    pretrained_image_size: int = 224,
    multiscale_stages: Sequence[int] = (1, 2, 3, 4),
    multiscale_dim: int = 256,
    hashing_bits: int = 64,
    hashing_k_factor: int = 10,
    min_confidence: float = 0.5,
    k_prep: int = 10,
    train_max_images: int = 0,
    device: str = "auto",
    runtime: str = "auto",
    precision: str = "fp32",
    progress: bool = True,
    keep_rankings: bool = False,
    shifts: Sequence[str] = (),
    shift_seed: int = 0,
    fold_models: str | Path | None = None,
) -> dict[str, Any]:
    """Run the protocol; returns the JSON-ready document (per-method scores, per-fold training, timings).

    With ``keep_rankings`` the document also holds ``rankings`` (and ``shifted_rankings``): method -> (N, K)
    archive rows per query.
    ``train_max_images`` > 0 fine-tunes each fold on a class-balanced subsample of its training images (large
    archives on a CPU). ``runtime`` and ``precision`` describe images with every cnn (pretrained, fine-tuned,
    multi-scale); int8 is calibrated on each fold's training images. ``shifts`` (names of
    :data:`cbmir.training.reexport.SHIFTS`) also queries every image re-exported with those changes (drawn from
    ``shift_seed``), described by its fold's own models, against the unshifted archive: the document's ``site_shift``
    holds each ranking's P@1, P@10 and seed mAP unshifted and shifted, patient-disjoint like the rest.
    ``fold_models`` is a folder that keeps each fold's fine-tuned checkpoint (``fold-F-of-K.pt``); a checkpoint
    already there, trained with the same configuration on the same images, is loaded instead of trained again, so
    search options and inference settings can be compared on the same models.
    """
    train_config = train_config or TrainConfig(device=device)
    labels = data.column(label_field)
    if any(v == "" for v in labels):
        raise InvalidInputError(f"every image needs a {label_field!r} value for cross-validation; use --select")
    groups = data.column(group_field) if group_field else [""] * len(data)
    fold_of = group_kfold(groups, folds, seed)
    n = len(data)
    codes, sizes = group_codes(groups)
    members = np.split(np.argsort(codes, kind="stable"), np.cumsum(sizes)[:-1])
    excluded = [members[codes[i]] for i in range(n)]
    needed = {name for spec in methods for name in parse_method(spec).names}
    unknown = needed - set(FIXED) - set(LEARNED)
    if unknown:
        raise InvalidInputError(f"unknown cross-validation method(s) {sorted(unknown)}; use {FIXED + LEARNED}")

    shifted_images = reexport_images(data.images, data.uris, shifts, shift_seed) if shifts else []
    fixed: dict[str, MethodIndex] = {}
    pretrained: dict[str, Any] = {}
    fixed_shifted: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    for name in sorted(needed & set(FIXED)):
        t0 = time.perf_counter()
        cfg: dict[str, Any] = {"device": device}
        if name == "cnn":
            cfg.update(
                image_size=pretrained_image_size,
                runtime=runtime,
                precision=precision,
                pca_dim=DEFAULT_PROJECTION_DIM,
                site_whiten=SITE_WHITEN_AUTO,
            )
        extractor = create_extractor(name, **cfg)
        if extractor.needs_fit:
            sample = np.random.default_rng(seed).choice(n, min(n, 5000), replace=False)
            extractor.fit([data.images[i] for i in sample])
        fixed[name] = _method_index(name, name, _describe(extractor, data.images), extractor.metric)
        if name == "cnn":
            pretrained = {key: extractor.config()[key] for key in ("image_size", "pca_dim", "site_whiten")}
        if shifts:
            fixed_shifted[name] = extractor.transform(_extract(extractor, shifted_images))
        timings[f"describe_{name}_s"] = round(time.perf_counter() - t0, 1)
        log.info("described %d images with %s in %.1f s", n, name, timings[f"describe_{name}_s"])

    start = train_config.weights
    start_weights = sha256_file(start) if os.path.isfile(start) else start
    rows = {spec: np.full((n, K), -1, np.int64) for spec in methods}
    shifted_rows = {spec: np.full((n, K), -1, np.int64) for spec in methods} if shifts else {}
    fold_info: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"classpred_routed": 0, "classpred_correct": 0, "head_correct": 0}
    search_s = dict.fromkeys(methods, 0.0)
    routing_counted = next((spec for spec in methods if parse_method(spec).method == "classpred"), None)
    speed: dict[str, list[float]] = {"flat_ms": [], "hashing_ms": []}
    for fold in range(folds):
        test = np.flatnonzero(fold_of == fold)
        train = np.flatnonzero(fold_of != fold)
        if train_max_images:
            train = train[balanced_subsample([labels[i] for i in train], train_max_images, seed=seed + fold)]
        learned: dict[str, MethodIndex] = {}
        info: dict[str, Any] = {"fold": fold, "queries": int(len(test)), "train_images": int(len(train))}
        ft: CNNExtractor | None = None
        head: np.ndarray | None = None
        if needed & set(LEARNED):
            cfg_fold = TrainConfig(**{**asdict(train_config), "seed": train_config.seed + fold})
            identity = _fold_identity(fold, folds, label_field, [data.ids[i] for i in train], cfg_fold, start_weights)
            saved = Path(fold_models) / f"fold-{fold}-of-{folds}.pt" if fold_models else None
            ft = _load_fold_model(saved, identity, cfg_fold, device, runtime, precision) if saved else None
            if ft is None:
                result = train_extractor(
                    [data.images[i] for i in train],
                    [labels[i] for i in train],
                    [groups[i] for i in train],
                    cfg_fold,
                    progress=progress,
                    runtime=runtime,
                    precision=precision,
                )
                result.training.update(label_field=label_field, cross_validation=identity)
                ft = result.extractor
                ft.training = result.training
                if saved:
                    save_checkpoint(result, saved)
            else:
                info["reused"] = str(saved)
            training = ft.training or {}
            info.update(
                train_s=training.get("seconds"),
                best_epoch=training.get("best_epoch"),
                best_val_mAP=training.get("best_val_mAP"),
                epochs_run=len(training.get("history") or []),
            )
            t0 = time.perf_counter()
            ft.set_projection(DEFAULT_PROJECTION_DIM, site_whiten=SITE_WHITEN_AUTO)
            if ft.needs_fit:
                ft.fit(data.images)
            info["finetuned_projection"] = {"pca_dim": ft.pca_dim, "site_whiten": ft.site_whiten}
            raw = _extract(ft, data.images)
            descriptors = ft.transform(raw)
            info["describe_s"] = round(time.perf_counter() - t0, 1)
            learned["finetuned"] = _method_index("finetuned", "cnn", descriptors, "l2")
            head = ft.class_probabilities(raw[test])
            if "classpred" in needed:
                learned["classpred"] = learned["finetuned"]
                extra["head_correct"] += int((np.asarray(ft.classes)[head.argmax(1)] == np.asarray(labels)[test]).sum())
            if "hashing" in needed:
                t0 = time.perf_counter()
                learned["hashing"] = _method_index(
                    "hashing", "cnn", descriptors, "l2", "itq", {"bits": hashing_bits, "k_factor": hashing_k_factor}
                )
                info["hashing_build_s"] = round(time.perf_counter() - t0, 2)
                speed["flat_ms"].append(_search_ms(learned["finetuned"].index, descriptors[test]))
                speed["hashing_ms"].append(_search_ms(learned["hashing"].index, descriptors[test]))
            if "multiscale" in needed:
                with tempfile.TemporaryDirectory() as tmp:
                    ckpt = saved or save_checkpoint(result, Path(tmp) / "fold.pt")  # trained: none was reused
                    ms = _checkpoint_extractor(
                        ckpt,
                        train_config,
                        device,
                        runtime,
                        precision,
                        stages=multiscale_stages,
                        pca_dim=min(multiscale_dim, n),
                    )
                    if ms.needs_fit:
                        ms.fit([data.images[i] for i in train[:256]])
                t0 = time.perf_counter()
                learned["multiscale"] = _method_index("multiscale", "cnn", _describe(ms, data.images), "l2")
                info["multiscale_describe_s"] = round(time.perf_counter() - t0, 1)
        records = Records.from_columns(list(data.ids), list(data.ids), data.metadata)
        bundle = Bundle(Path(f"cv-fold-{fold}"), {}, records, {**fixed, **learned})
        engine = SearchEngine(bundle, device=device, extractors={"classpred": ft} if ft is not None else None)
        fold_excluded = [excluded[i] for i in test]
        queries = {name: index.descriptors[test] for name, index in bundle.methods.items()}
        for spec in methods:
            t0 = time.perf_counter()
            rows[spec][test], predicted = _rank(
                engine, spec, queries, head, fold_excluded, k_prep=k_prep, min_confidence=min_confidence
            )
            search_s[spec] += time.perf_counter() - t0
            if spec == routing_counted and predicted is not None and ft is not None:
                routed = predicted >= 0
                extra["classpred_routed"] += int(routed.sum())
                extra["classpred_correct"] += int(
                    (np.asarray(ft.classes)[predicted[routed]] == np.asarray(labels)[test][routed]).sum()
                )
        if shifts:
            moved = [shifted_images[i] for i in test]
            shifted_queries = {name: vectors[test] for name, vectors in fixed_shifted.items()}
            shifted_head = None
            if ft is not None:
                moved_raw = _extract(ft, moved)
                shifted_head = ft.class_probabilities(moved_raw)
                moved_descriptors = ft.transform(moved_raw)
                for name in set(learned) - {"multiscale"}:
                    shifted_queries[name] = moved_descriptors
                if "multiscale" in learned:
                    shifted_queries["multiscale"] = ms.transform(_extract(ms, moved))
            for spec in methods:
                shifted_rows[spec][test], _ = _rank(
                    engine,
                    spec,
                    shifted_queries,
                    shifted_head,
                    fold_excluded,
                    k_prep=k_prep,
                    min_confidence=min_confidence,
                )
        fold_info.append(info)
        log.info("fold %d/%d done: %s", fold + 1, folds, info)

    results = []
    for spec in methods:
        for rel_spec in relevance:
            scores = score_rankings(rows[spec], data.metadata, data.metadata, excluded, rel_spec)
            results.append({"method": spec, "relevance": rel_spec, **scores})
            log.info("%s / %s: seed mAP %.4f", spec, rel_spec, scores["seed_mAP"])
    summary: dict[str, Any] = {
        "search_ms_per_query": {spec: round(1000 * seconds / n, 4) for spec, seconds in search_s.items()}
    }
    if "classpred" in needed:
        summary["classpred_routed_fraction"] = round(extra["classpred_routed"] / n, 4)
        summary["classpred_routed_accuracy"] = round(extra["classpred_correct"] / max(1, extra["classpred_routed"]), 4)
        summary["head_accuracy"] = round(extra["head_correct"] / n, 4)
    if speed["flat_ms"]:
        summary["flat_search_ms_per_query"] = round(float(np.median(speed["flat_ms"])), 4)
        summary["hashing_search_ms_per_query"] = round(float(np.median(speed["hashing_ms"])), 4)
        summary["hashing_speedup"] = round(
            summary["flat_search_ms_per_query"] / summary["hashing_search_ms_per_query"], 2
        )
    doc: dict[str, Any] = {
        "results": results,
        "summary": summary,
        "folds": fold_info,
        "config": {
            "protocol": f"group {folds}-fold cross-validation" + (f" by {group_field}" if group_field else ""),
            "archive_count": n,
            "label_field": label_field,
            "group_field": group_field,
            "exclude": f"the query's own {group_field}" if group_field else "the query itself",
            "seed": seed,
            "k": K,
            "k_prep": k_prep,
            "train_max_images": train_max_images,
            "pretrained_image_size": pretrained_image_size,
            "pretrained_cnn": pretrained,
            "multiscale": {"stages": list(multiscale_stages), "pca_dim": multiscale_dim},
            "hashing": {"bits": hashing_bits, "k_factor": hashing_k_factor},
            "min_confidence": min_confidence,
            "training": asdict(train_config),
            "timings": timings,
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    if shifts:
        doc["site_shift"] = {
            "shifts": list(shifts),
            "seed": shift_seed,
            "queries": n,
            "exclude_same": group_field,
            "results": [],
        }
        for spec in methods:
            ranked = {"unshifted": rows[spec], "shifted": shifted_rows[spec]}
            for rel_spec in relevance:
                doc["site_shift"]["results"].append(
                    shift_scores(spec, rel_spec, ranked, data.metadata, data.metadata, excluded)
                )
    if keep_rankings:
        doc["rankings"] = rows
        if shifts:
            doc["shifted_rankings"] = shifted_rows
    return doc
