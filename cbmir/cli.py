"""The ``cbmir`` command: train, build, add, remove, eval, serve, query, info and demo."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from cbmir.defaults import (
    DEFAULT_PROJECTION_DIM,
    INTENSITY_EXTRACTORS,
    INTENSITY_MODES,
    PROJECTIONS,
    SITE_WHITEN_AUTO,
    SMOOTH_EXTRACTORS,
)
from cbmir.errors import CbmirError, InvalidInputError
from cbmir.options import DEVICE_CHOICES, HelpFormatter, add_options, from_options

log = logging.getLogger("cbmir")


def _pairs(items: list[str] | None, what: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items or []:
        if "=" not in item:
            raise InvalidInputError(f"{what} {item!r}: use FIELD=VALUE")
        key, value = item.split("=", 1)
        out.setdefault(key, []).append(value)
    return out


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def extractor_configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per-method extractor configuration from the build flags."""
    configs: dict[str, dict[str, Any]] = {}
    for name in _csv(args.extractors):
        if name == "cnn":
            cfg: dict[str, Any] = {
                "model": args.model,
                "weights": args.weights or "imagenet",
                "runtime": args.runtime,
                "precision": args.precision,
            }
            if args.image_size:
                cfg["image_size"] = args.image_size
            cfg.update(_projection_config(args))
            configs[name] = cfg
        elif name == "bovw":
            configs[name] = {"words": args.bovw_words}
        else:
            configs[name] = {}
        if args.intensity != "none":
            if name not in INTENSITY_EXTRACTORS:
                raise InvalidInputError(
                    f"--intensity applies to {', '.join(INTENSITY_EXTRACTORS)}; extractor {name!r} does not take it"
                )
            configs[name]["intensity"] = args.intensity
        if args.smooth and name in SMOOTH_EXTRACTORS:
            configs[name]["smooth"] = args.smooth
    return configs


def _projection_config(args: argparse.Namespace) -> dict[str, Any]:
    """The cnn's ``pca_dim``/``whiten``/``site_whiten`` from ``--projection``, ``--pca-dim``, ``--whiten`` and
    ``--site-whiten`` (which is ``--projection site-whiten``)."""
    projection = args.projection
    if args.site_whiten:
        if projection not in ("auto", "site-whiten"):
            raise InvalidInputError(f"--site-whiten contradicts --projection {projection}: keep one of them")
        projection = "site-whiten"
    if args.whiten and projection != "pca":
        raise InvalidInputError(
            "--whiten scales PCA components: add --projection pca (site whitening learns its own whitening)"
        )
    if projection == "none":
        if args.pca_dim is not None:
            raise InvalidInputError("--pca-dim sets the width of a projection: drop it or use --projection pca")
        return {}
    if args.pca_dim is not None and args.pca_dim < 1:
        raise InvalidInputError(f"--pca-dim must be at least 1, got {args.pca_dim}; --projection none keeps the width")
    dim = args.pca_dim or DEFAULT_PROJECTION_DIM
    if projection == "pca":
        return {"pca_dim": dim, "whiten": args.whiten}
    return {"pca_dim": dim, "site_whiten": True if projection == "site-whiten" else SITE_WHITEN_AUTO}


def _index_types(value: str) -> str | dict[str, str]:
    """``hnsw`` (every method) or ``cnn=itq,hog=hnsw`` (per method; the others stay flat)."""
    if "=" not in value:
        return value
    pairs = _pairs(_csv(value), "--index-type")
    return {name: types[-1] for name, types in pairs.items()}


def _windows(args: argparse.Namespace) -> Any:
    from cbmir.extractors.imaging import parse_windows

    return parse_windows(getattr(args, "dicom_window", None))


def _selected_archive(args: argparse.Namespace) -> Any:
    """The archive named by --images/--labels, narrowed by --select FIELD=VALUE."""
    from cbmir.index_build import open_archive

    archive = open_archive(args.images, args.labels, windows=_windows(args))
    missing = getattr(archive, "missing", [])
    if missing:
        log.warning("%d rows of the labels CSV name no image in the archive (e.g. %s)", len(missing), missing[:3])
    where = {k: v[-1] for k, v in _pairs(args.select, "--select").items()}
    splits = sorted({e.metadata["split"] for e in archive.entries if "split" in e.metadata})
    if len(splits) > 1 and "split" not in where:
        log.warning(
            "%s holds the splits %s and all of them are used; --select split=%s uses one",
            archive.source,
            ", ".join(splits),
            splits[-1] if "train" not in splits else "train",
        )
    return archive.select(where)


def _labelled_images(args: argparse.Namespace) -> tuple[Any, Any]:
    """The selected archive and its decoded images that carry a --label-field value (--max-images subsample)."""
    from cbmir.training.dataset import balanced_subsample, decode_archive

    archive = _selected_archive(args)
    if not len(archive):
        raise InvalidInputError(
            f"no images in {archive.source}; the labels CSV's path column must be relative to --images"
        )
    data = decode_archive(archive, progress=not args.no_progress)
    labels = data.column(args.label_field)
    keep = [i for i, v in enumerate(labels) if v != ""]
    if len(keep) < len(labels):
        log.warning("%d images have no %r value and are left out", len(labels) - len(keep), args.label_field)
    keep = [keep[i] for i in balanced_subsample([labels[i] for i in keep], args.max_images, seed=args.seed)]
    log.info("%d labelled images of %s (%d unreadable)", len(keep), archive.source, len(data.skipped))
    return archive, data.subset(keep)


def _unlabelled_images(args: argparse.Namespace) -> tuple[Any, Any]:
    """The selected archive and all its decoded images (--max-images: a random subsample, drawn before decoding);
    no label is read."""
    import numpy as np

    from cbmir.training.dataset import decode_archive

    archive = _selected_archive(args)
    if not len(archive):
        raise InvalidInputError(f"no images in {archive.source}")
    if args.max_images and args.max_images < len(archive):
        rng = np.random.default_rng(args.seed)
        archive = archive.subset(np.sort(rng.choice(len(archive), args.max_images, replace=False)).tolist())
    data = decode_archive(archive, progress=not args.no_progress)
    log.info("%d images of %s without labels (%d unreadable)", len(data), archive.source, len(data.skipped))
    return archive, data


def check_model_arguments(model: str, weights: str | None, device: str) -> None:
    """Refuse a bad --model, --weights or --device before any image is read.

    Raises:
        InvalidInputError: the name is not a timm model, the weights file is missing, or CUDA is absent.
    """
    import timm

    from cbmir.extractors import resolve_device

    resolve_device(device)
    if not timm.is_model(model):
        close = timm.list_models(f"*{model.split('_')[0]}*")[:5]
        raise InvalidInputError(
            f"--model {model!r} is not a timm model" + (f"; similar: {', '.join(close)}" if close else "")
        )
    if weights and weights not in ("imagenet", "timm", "random") and not os.path.isfile(weights):
        raise InvalidInputError(f"--weights {weights}: no such file; use imagenet, timm, random or a checkpoint path")


def cmd_build(args: argparse.Namespace) -> int:
    from cbmir.extractors import extractor_class
    from cbmir.index_build import build_bundle

    configs = extractor_configs(args)
    for name, cfg in configs.items():
        extractor_class(cfg.get("extractor", name))
    if "cnn" in configs:
        check_model_arguments(args.model, args.weights, args.device)
        from cbmir.extractors import resolve_device
        from cbmir.extractors.runtimes import check_precision, resolve_runtime

        check_precision(resolve_runtime(args.runtime, resolve_device(args.device)), args.precision)
    archive = _selected_archive(args)
    log.info("archive %s: %d images", archive.source, len(archive))
    t0 = time.perf_counter()
    report = build_bundle(
        archive,
        args.out,
        configs,
        batch_size=args.batch_size,
        device=args.device,
        fit_sample=args.fit_sample,
        index_type=_index_types(args.index_type),
        progress=not args.no_progress,
        ray=_ray_options(args),
    )
    total = time.perf_counter() - t0
    print(f"wrote {report.path} ({report.count} images indexed, {len(report.skipped)} skipped) in {total:.1f} s")
    for name, ips in report.images_per_s.items():
        print(f"  {name:<6} {ips:8.1f} images/s")
    for stage, seconds in report.timings.items():
        print(f"  {stage:<14} {seconds:8.2f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cbmir.training.trainer import save_checkpoint, train_extractor

    check_model_arguments(args.model, args.weights, args.device)
    config = _train_config(args)
    if config.self_supervised:
        from cbmir.training.self_supervised import train_self_supervised

        archive, data = _unlabelled_images(args)
        groups = data.column(args.group_field) if args.group_field else None
        result = train_self_supervised(data.images, groups, config, progress=not args.no_progress)
    else:
        archive, data = _labelled_images(args)
        labels = data.column(args.label_field)
        groups = data.column(args.group_field) if args.group_field else None
        result = train_extractor(data.images, labels, groups, config, progress=not args.no_progress)
    result.training.update(
        {
            "archive": archive.source,
            "label_field": None if config.self_supervised else args.label_field,
            "group_field": args.group_field,
            "max_images": args.max_images,
            "command": " ".join(["cbmir", *sys.argv[1:]]),
        }
    )
    path = save_checkpoint(result, args.out)
    if config.self_supervised:
        diagnostic = result.history[-1].get("val_own_view_top1") if result.history else None
        summary = f"{result.best_epoch} epochs without labels, held-out own-view top-1 {diagnostic}"
    else:
        summary = f"best epoch {result.best_epoch}, validation mAP {result.best_val_map}"
    print(f"wrote {path}: {summary}, {result.seconds:.0f} s on {result.training['device']}")
    print(
        f"index with: cbmir build --images {args.images} --extractors cnn --weights {path} "
        f"--image-size {args.image_size} --model {args.model} --out DIR"
    )
    return 0


INGEST_STREAM = 128
"""Images per AddImages stream of ``cbmir add --target`` (each stream is one new version)."""


def _add_over_api(args: argparse.Namespace, archive: Any) -> int:
    """``cbmir add --target``: stream the archive's files to a running server (npz arrays as pixels)."""
    import numpy as np

    from cbmir.client import IngestItem
    from cbmir.index_build.archive import read_archived_bytes

    def items(indices: range) -> Any:
        for i in indices:
            entry = archive.entries[i]
            item_id = args.id_prefix + entry.id
            if entry.uri.startswith("npz://"):
                pixels = np.ascontiguousarray(archive.load(i).image, dtype=np.float32)
                yield IngestItem(item_id, pixels=pixels, metadata=entry.metadata)
            else:
                yield IngestItem(item_id, image=read_archived_bytes(entry.uri), metadata=entry.metadata)

    counts = {"added": 0, "duplicate": 0, "error": 0}
    reply = None
    with _remote_client(args) as client:
        for start in range(0, len(archive), INGEST_STREAM):
            reply = client.add_images(items(range(start, min(start + INGEST_STREAM, len(archive)))))
            for result in reply.results:
                counts[result.status] = counts.get(result.status, 0) + 1
                if result.status == "error":
                    print(f"error: {result.id}: {result.error}", file=sys.stderr)
    version = reply.version if reply is not None else "?"
    print(
        f"{args.target}: version {version}, {reply.count if reply else '?'} images ({counts['added']} added, "
        f"{counts['duplicate']} already indexed, {counts['error']} refused)"
    )
    return FAILURE if counts["error"] else 0


def _remote_client(args: argparse.Namespace) -> Any:
    from cbmir.client import RetrievalClient

    return RetrievalClient(
        args.target,
        timeout=args.timeout,
        token=os.environ.get("CBMIR_TOKEN") or None,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def cmd_add(args: argparse.Namespace) -> int:
    from cbmir.index_build import add_to_bundle

    if bool(args.index) == bool(args.target):
        raise InvalidInputError("pass --index BUNDLE (write the bundle here) or --target HOST:PORT (over the API)")
    archive = _selected_archive(args)
    if args.target:
        return _add_over_api(args, archive)
    report = add_to_bundle(
        args.index,
        archive,
        id_prefix=args.id_prefix,
        batch_size=args.batch_size,
        device=args.device,
        runtime=args.runtime,
        progress=not args.no_progress,
        ray=_ray_options(args),
    )
    print(
        f"{report.path}: {report.count} images ({len(report.added)} added, {len(report.duplicates)} already "
        f"indexed, {len(report.skipped)} unreadable)"
    )
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from cbmir.index_build import remove_from_bundle

    ids = list(args.ids or [])
    if args.ids_file:
        ids += [line.strip() for line in Path(args.ids_file).read_text().splitlines() if line.strip()]
    if not ids:
        raise InvalidInputError("name the ids to remove with --ids or --ids-file")
    if bool(args.index) == bool(args.target):
        raise InvalidInputError("pass --index BUNDLE (write the bundle here) or --target HOST:PORT (over the API)")
    if args.target:
        with _remote_client(args) as client:
            reply = client.remove_images(ids, missing_ok=args.missing_ok)
        print(f"{args.target}: version {reply.version}, {reply.count} images ({len(reply.removed)} removed)")
        return 0
    report = remove_from_bundle(args.index, ids, missing_ok=args.missing_ok)
    print(f"{report.path}: {report.count} images ({len(report.removed)} removed)")
    return 0


def _markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| method | relevance | queries | P@1 | P@10 | seed mAP | AP@10 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ap = "n/a" if r["AP@10"] is None else f"{r['AP@10']:.4f}"
        lines.append(
            f"| {r['method']} | {r['relevance']} | {r['queries']} | {r['mP@k'][0]:.4f} | {r['mP@k'][-1]:.4f} "
            f"| {r['seed_mAP']:.4f} | {ap} |"
        )
    chance = {r["relevance"]: r for r in results if r.get("chance_P@k") is not None}
    for relevance, r in chance.items():
        c = r["chance_P@k"]
        lines.append(f"| chance (random ranking) | {relevance} | {r['queries']} | {c:.4f} | {c:.4f} | {c:.4f} | n/a |")
    return "\n".join(lines)


def _train_config(args: argparse.Namespace) -> Any:
    from cbmir.training import TrainConfig

    return from_options(TrainConfig, args)


def _add_train_flags(p: Any, *, skip: tuple[str, ...] = ()) -> None:
    from cbmir.training import TrainConfig

    add_options(p, TrainConfig, skip=("device", *skip))


def _print_site_shift(shift: dict[str, Any]) -> None:
    print(f"\nsite shift ({'+'.join(shift['shifts'])}, {shift['queries']} queries, seed {shift['seed']}):")
    print("| method | relevance | P@1 | P@1 shifted | P@10 | P@10 shifted |")
    print("|---|---|---|---|---|---|")
    for r in shift["results"]:
        u, s = r["unshifted"], r["shifted"]
        print(
            f"| {r['method']} | {r['relevance']} | {u['P@1']:.4f} | {s['P@1']:.4f} | {u['P@10']:.4f} | {s['P@10']:.4f} |"
        )


def cmd_cross_validate(args: argparse.Namespace) -> int:
    from cbmir.evaluation.cross_validation import cross_validate
    from cbmir.training.reexport import parse_shifts

    archive, data = _labelled_images(args)
    t0 = time.perf_counter()
    doc = cross_validate(
        data,
        label_field=args.label_field,
        group_field=args.group_field,
        relevance=_csv(args.relevance),
        methods=_csv(args.methods or "cnn,hog,cnn+hog,finetuned,finetuned+hog,multiscale,hashing,classpred"),
        folds=args.cv_folds,
        seed=args.seed,
        train_config=_train_config(args),
        pretrained_image_size=args.pretrained_image_size,
        k_prep=args.k_prep,
        train_max_images=args.train_max_images,
        device=args.device,
        runtime="auto" if args.runtime == "bundle" else args.runtime,
        precision=args.precision or "fp32",
        progress=not args.no_progress,
        shifts=parse_shifts(args.shift) if args.shift else (),
        shift_seed=args.shift_seed,
        fold_models=args.fold_models,
    )
    doc["config"].update(
        archive=archive.source, total_s=round(time.perf_counter() - t0, 1), command=" ".join(["cbmir", *sys.argv[1:]])
    )
    from cbmir.machine import cpu_model

    doc["config"]["cpu"] = cpu_model()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    print(_markdown_table(doc["results"]))
    if "site_shift" in doc:
        _print_site_shift(doc["site_shift"])
    print(json.dumps(doc["summary"]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cbmir.evaluation.protocols import evaluate
    from cbmir.index_build import load_bundle, open_archive

    if args.cv_folds:
        if not args.images:
            raise InvalidInputError("--cv-folds needs --images (the labelled archive to split)")
        return cmd_cross_validate(args)
    if not args.index:
        raise InvalidInputError("pass --index BUNDLE, or --images ARCHIVE --cv-folds K for cross-validation")
    bundle = load_bundle(args.index)
    methods = (
        _csv(args.methods)
        if args.methods
        else list(bundle.methods) + (["cnn+hog"] if {"cnn", "hog"} <= set(bundle.methods) else [])
    )
    queries = open_archive(args.queries, args.query_labels, windows=bundle.dicom_windows) if args.queries else None
    doc = evaluate(
        bundle,
        methods,
        _csv(args.relevance),
        queries=queries,
        k_prep=args.k_prep,
        exclude_same=args.exclude_same,
        device=args.device,
        runtime=args.runtime,
        precision=args.precision,
        progress=not args.no_progress,
    )
    doc["config"]["command"] = " ".join(["cbmir", *sys.argv[1:]])
    if args.study_field:
        from cbmir.evaluation.protocols import evaluate_studies

        relevance = _csv(args.relevance)[0]
        doc["studies"] = [
            evaluate_studies(bundle, m, args.study_field, relevance, device=args.device)
            for m in methods
            if "+" not in m
        ]
    if args.shift:
        from cbmir.evaluation.site_shift import evaluate_site_shift
        from cbmir.training.reexport import parse_shifts

        doc["site_shift"] = evaluate_site_shift(
            bundle,
            methods,
            _csv(args.relevance),
            parse_shifts(args.shift),
            queries=args.shift_queries,
            seed=args.shift_seed,
            exclude_same=args.exclude_same,
            k_prep=args.k_prep,
            device=args.device,
            runtime=args.runtime,
            precision=args.precision,
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    print(_markdown_table(doc["results"]))
    if "site_shift" in doc:
        _print_site_shift(doc["site_shift"])
    for study in doc.get("studies", []):
        figures = ", ".join(f"{name} {value:.4f}" for name, value in study["seed_mAP"].items())
        print(f"study queries ({study['method']}, {study['studies']} studies by {study['study_field']}): {figures}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from cbmir.index_build import load_bundle
    from cbmir.search_backends.milvus_publish import connect_milvus, publish_bundle
    from cbmir.search_backends.milvus_schema import check_prefix

    check_prefix(args.collection)
    bundle = load_bundle(args.index, search_indexes=False)
    client = connect_milvus(args.milvus)
    try:
        report = publish_bundle(bundle, client, args.collection, keep=args.keep, on_progress=print)
    finally:
        client.close()
    print(
        f"published {bundle.version} ({len(bundle)} images, {len(report.collections)} methods, "
        f"{len(report.reused)} already there) to {args.milvus} in {report.seconds:.1f} s"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from cbmir.index_build.bundle import read_manifest, resolve_version_dir, verify_files

    version_dir = resolve_version_dir(args.index)
    manifest = read_manifest(version_dir)
    verify_files(version_dir, manifest)
    summary = {k: manifest[k] for k in ("version", "created", "count", "cbmir_version")}
    summary["methods"] = {
        n: {k: m[k] for k in ("extractor", "dim", "metric", "index_type", "images_per_s")}
        for n, m in manifest["methods"].items()
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cbmir.server.config import ServerConfig
    from cbmir.server.startup import serve_forever

    serve_forever(from_options(ServerConfig, args))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from cbmir.client import format_hits

    with _remote_client(args) as client:
        hits = client.search_image(
            Path(args.image).read_bytes(),
            k=args.k,
            method=args.method,
            rerank=args.rerank,
            k_prep=args.k_prep,
            filters=_pairs(args.filter, "--filter"),
            predict_class=args.predict_class,
            class_vote=args.class_vote,
            group_by=args.group_by or "",
            group_size=args.group_size,
            max_distance=args.max_distance,
            offset=args.offset,
            expand=args.expand,
            reciprocal_k1=args.reciprocal,
        )
        predicted = client.last_trailers.get("cbmir-predicted-class")
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], indent=2))
    else:
        if args.predict_class:
            print(f"searched class: {predicted}" if predicted else "searched the whole archive (class uncertain)")
        print(format_hits(hits, fields=args.columns))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import uvicorn

    from cbmir.ui.app import UiConfig, create_app

    eval_doc = None
    if args.eval:
        try:
            eval_doc = json.loads(Path(args.eval).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"--eval {args.eval}: cannot read the eval result ({exc})") from exc
    client = _remote_client(args)
    client.index_info()  # fail now, with the server's status, rather than on the first page load
    app = create_app(client, UiConfig(max_upload_mb=args.max_upload_mb, eval_doc=eval_doc))
    print(f"cbmir ui for {args.target} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cbmir.demo import run_demo

    return run_demo(Path(args.out), device=args.device)


def _add_remote(p: Any) -> None:
    p.add_argument(
        "--target",
        help="HOST:PORT of a running cbmir serve: change its index over the API (admin token "
        "from CBMIR_TOKEN) instead of writing a bundle",
    )
    _add_client_options(p, timeout=300.0)


def _add_client_options(p: Any, timeout: float) -> None:
    """Deadline and TLS options of every command that talks to a server (the token comes from CBMIR_TOKEN)."""
    p.add_argument("--timeout", type=float, default=timeout, help="deadline of each call to the server in seconds")
    p.add_argument("--tls-ca", help="PEM CA of the server certificate (turns on TLS)")
    p.add_argument("--tls-cert", help="client certificate for mutual TLS")
    p.add_argument("--tls-key", help="client key for mutual TLS")


def _add_device(p: Any) -> None:
    p.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="where extractors run (auto: CUDA when present)"
    )


def _add_runtime(p: Any, *, indexed: bool) -> None:
    """--runtime and --precision of the cnn extractor; ``indexed``: default to what the bundle recorded."""
    from cbmir.defaults import PRECISIONS, RUNTIME_CHOICES

    if indexed:
        _add_indexed_runtime(p)
        p.add_argument("--precision", choices=PRECISIONS, help="cnn precision (default: the bundle's)")
        return
    p.add_argument(
        "--runtime",
        default="auto",
        choices=RUNTIME_CHOICES,
        help="cnn inference runtime (auto: OpenVINO on CPU, torch on CUDA); recorded in the bundle",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="cnn precision (int8 is calibrated on the --fit-sample images); recorded in the bundle",
    )


def _add_indexed_runtime(p: Any) -> None:
    """--runtime of commands that describe with a bundle's cnn (default: the runtime it was indexed with)."""
    from cbmir.defaults import RUNTIME_CHOICES

    p.add_argument(
        "--runtime",
        default="bundle",
        choices=("bundle", *RUNTIME_CHOICES),
        help="cnn inference runtime (bundle: the one it was indexed with; another one is logged as a mix)",
    )


def _add_ray(p: Any) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="extract on Ray Data: no ADDRESS starts a local Ray (or joins RAY_ADDRESS), 'auto' joins a running "
        "cluster, or a cluster address (ray://HOST:10001)",
    )
    p.add_argument("--ray-actors", type=_positive_int, help="extractor actors (default: one per CPU, or per GPU)")


def _ray_options(args: argparse.Namespace) -> Any:
    if not args.ray:
        if args.ray_actors:
            raise InvalidInputError("--ray-actors needs --ray")
        return None
    from cbmir.index_build.ray_extraction import RayOptions

    return RayOptions(address=None if args.ray == "local" else args.ray, actors=args.ray_actors)


def _add_no_progress(p: Any) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")


def _add_dicom_window(p: Any) -> None:
    p.add_argument(
        "--dicom-window",
        action="append",
        metavar="MODALITY=CENTRE,WIDTH",
        help="VOI window for DICOM files without one, e.g. CT=40,400 (recorded in the bundle)",
    )


def _add_select(p: Any, verb: str) -> None:
    p.add_argument(
        "--select",
        action="append",
        metavar="FIELD=VALUE",
        help=f"{verb} images whose metadata FIELD is VALUE (repeatable; an .npz's splits: split=train)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbmir", description="Content-based medical image retrieval", formatter_class=HelpFormatter
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging: -v cbmir's debug lines, -v -v every library's"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also CBMIR_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="index an archive of images into a bundle", formatter_class=HelpFormatter)
    b.add_argument("--images", required=True, help="folder tree, .zip of images, or .npz of arrays")
    b.add_argument("--labels", help="CSV keyed by relative path (column 'path'); default: labels.csv beside it")
    b.add_argument("--out", required=True, help="bundle directory (a new version is published atomically)")
    b.add_argument(
        "--extractors",
        default="cnn,hog",
        help="comma-separated: cnn, hog, bovw (bovw is opt-in: the weakest here and slow to fit)",
    )
    b.add_argument("--model", default="tf_efficientnet_lite0", help="timm backbone for cnn")
    b.add_argument("--weights", help="imagenet (offline package), timm (hub download), random, or a file")
    b.add_argument("--image-size", type=int, default=0, help="cnn input side (default 224)")
    b.add_argument(
        "--projection",
        choices=PROJECTIONS,
        default="auto",
        help="cnn descriptor projection: site-whiten (learned without labels from the fit sample and its site-shift "
        "re-exports: descriptors that hold across hospitals; see the README), pca, or none (the network's full "
        "width); auto: site-whiten when the fit sample holds 4 images per output dimension, none below",
    )
    b.add_argument(
        "--pca-dim",
        type=int,
        default=None,
        help=f"output width of --projection site-whiten or pca (default {DEFAULT_PROJECTION_DIM})",
    )
    b.add_argument(
        "--intensity",
        choices=INTENSITY_MODES,
        default="none",
        help="normalise each image's intensities before description (site robustness; see the README)",
    )
    b.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="Gaussian smoothing of cnn and hog inputs before description: sigma in pixels of a 224-pixel image, "
        "scaled with the input size (0: off; bovw's SIFT smooths on its own)",
    )
    b.add_argument("--whiten", action="store_true", help="scale the components of --projection pca to unit variance")
    b.add_argument(
        "--site-whiten",
        action="store_true",
        help="--projection site-whiten, refusing archives too small to learn it instead of keeping the full width",
    )
    b.add_argument(
        "--bovw-words",
        type=int,
        default=0,
        help="BoVW vocabulary size; 0: the paper's 4000, fewer when the images give too few SIFT keypoints",
    )
    b.add_argument("--fit-sample", type=int, default=5000, help="images sampled to fit the BoVW vocabulary")
    b.add_argument(
        "--index-type",
        default="flat",
        metavar="TYPE|METHOD=TYPE,...",
        help="FAISS index: auto (by archive size), flat, ivf, hnsw, sq8, ivfpq or itq, for every method "
        "or per method (cnn=itq,hog=hnsw; the others stay flat)",
    )
    b.add_argument("--batch-size", type=int, default=64, help="images decoded and described per batch")
    _add_device(b)
    _add_runtime(b, indexed=False)
    _add_ray(b)
    _add_select(b, "index only")
    _add_no_progress(b)
    _add_dicom_window(b)
    b.set_defaults(func=cmd_build)

    a = sub.add_parser(
        "add",
        help="index more images into a bundle as a new version (nothing re-extracted)",
        formatter_class=HelpFormatter,
    )
    a.add_argument("--index", help="bundle directory to write (or --target)")
    _add_remote(a)
    a.add_argument("--images", required=True, help="folder tree, .zip or .npz of new images")
    a.add_argument("--labels", help="labels CSV for the new images")
    _add_select(a, "add only")
    a.add_argument("--id-prefix", default="", help="prepended to the new images' ids (keeps sources apart)")
    a.add_argument("--batch-size", type=int, default=64, help="images decoded and described per batch")
    _add_device(a)
    _add_indexed_runtime(a)
    _add_ray(a)
    _add_no_progress(a)
    a.set_defaults(func=cmd_add)

    r = sub.add_parser("remove", help="drop ids from a bundle as a new version", formatter_class=HelpFormatter)
    r.add_argument("--index", help="bundle directory to write (or --target)")
    _add_remote(r)
    r.add_argument("--ids", nargs="+", help="archive ids to remove")
    r.add_argument("--ids-file", help="file with one id per line")
    r.add_argument("--missing-ok", action="store_true", help="ignore ids that are not indexed")
    r.set_defaults(func=cmd_remove)

    t = sub.add_parser(
        "train",
        help="fine-tune a cnn backbone on an archive's labels, or without any (--self-supervised)",
        formatter_class=HelpFormatter,
    )
    t.add_argument("--images", required=True, help="folder tree, .zip of images, or .npz of arrays")
    t.add_argument("--labels", help="labels CSV (default: labels.csv beside or inside the archive)")
    t.add_argument(
        "--label-field", default="label", help="metadata column holding the class (unread with --self-supervised)"
    )
    t.add_argument("--group-field", help="column grouping images of one patient; validation never shares one")
    _add_select(t, "train only on")
    t.add_argument(
        "--max-images",
        type=int,
        default=0,
        help="class-balanced subsample of this many images (random with --self-supervised)",
    )
    _add_train_flags(t)
    _add_device(t)
    t.add_argument("--out", required=True, help="checkpoint file to write")
    _add_dicom_window(t)
    _add_no_progress(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval", help="retrieval quality of a bundle (mP@k, seed mAP, AP@10)", formatter_class=HelpFormatter
    )
    e.add_argument("--index", help="bundle to evaluate (leave-one-out or --queries)")
    e.add_argument("--queries", help="external query images (default: leave-one-out over the archive)")
    e.add_argument("--query-labels", help="labels CSV for --queries")
    e.add_argument(
        "--methods",
        help="comma-separated, e.g. cnn,hog,bovw,cnn+hog,cnn:qe3 (A+B = A re-ranked by B; "
        ":qeN = alpha query expansion over the top N hits)",
    )
    e.add_argument("--k-prep", type=int, default=10, help="candidates re-ranked for A+B methods")
    e.add_argument("--relevance", default="label", help="comma-separated fields; a&b needs both to match")
    e.add_argument("--exclude-same", help="never retrieve images sharing this field with the query (patient_id)")
    e.add_argument("--json", help="write the result document here")
    e.add_argument(
        "--shift",
        help="also query with re-exported archive images: windows,gamma,jpeg,resize,noise (any of them) or all; "
        "with --cv-folds every held-out image, described by its fold's models",
    )
    e.add_argument(
        "--shift-queries",
        type=_positive_int,
        default=500,
        help="archive images re-exported as queries (not --cv-folds)",
    )
    e.add_argument("--shift-seed", type=int, default=0, help="seed of the re-export parameters and the sample")
    _add_runtime(e, indexed=True)
    e.add_argument(
        "--study-field",
        help="also compare study queries (all images of one FIELD value and label, "
        "fused) with single images, e.g. patient_id",
    )
    _add_device(e)
    _add_no_progress(e)
    cv = e.add_argument_group("group k-fold cross-validation (fine-tunes per fold; no bundle needed)")
    cv.add_argument("--cv-folds", type=int, default=0, help="number of folds; needs --images")
    cv.add_argument("--images", help="labelled archive to split into folds")
    cv.add_argument("--labels", help="labels CSV for --images")
    _add_select(cv, "use only")
    cv.add_argument("--max-images", type=int, default=0, help="class-balanced subsample of this many images")
    cv.add_argument("--label-field", default="label", help="class column the fine-tuning learns")
    cv.add_argument("--group-field", help="patient column: folds and exclusions never split a group")
    _add_dicom_window(cv)
    cv.add_argument(
        "--train-max-images",
        type=int,
        default=0,
        help="fine-tune each fold on a class-balanced subsample of this many training images",
    )
    cv.add_argument("--pretrained-image-size", type=int, default=224, help="input side of the pretrained cnn")
    cv.add_argument(
        "--fold-models",
        metavar="DIR",
        help="keep each fold's fine-tuned checkpoint here; one trained with the same configuration and images is "
        "reused instead of trained again",
    )
    _add_train_flags(cv, skip=("self_supervised", "group_positives", "projection_dim"))
    e.set_defaults(func=cmd_eval)

    pub = sub.add_parser(
        "publish",
        help="load a bundle's vectors and metadata into Milvus (then: cbmir serve --milvus URI)",
        formatter_class=HelpFormatter,
    )
    pub.add_argument("--index", required=True, help="bundle directory (its live version is published)")
    pub.add_argument("--milvus", required=True, metavar="URI", help="milvus-lite file (FILE.db) or http://HOST:19530")
    pub.add_argument("--collection", default="cbmir", metavar="PREFIX", help="collection name prefix")
    pub.add_argument("--keep", type=_positive_int, default=2, help="bundle versions kept per method in Milvus")
    pub.set_defaults(func=cmd_publish)

    i = sub.add_parser("info", help="validate a bundle and print its summary", formatter_class=HelpFormatter)
    i.add_argument("--index", required=True, help="bundle directory (its live version is checked)")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("serve", help="serve a bundle over gRPC", formatter_class=HelpFormatter)
    from cbmir.server.config import ServerConfig

    add_options(s, ServerConfig)
    s.set_defaults(func=cmd_serve)

    q = sub.add_parser(
        "query", help="send an image to a running server and print the hits", formatter_class=HelpFormatter
    )
    q.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of a running cbmir serve")
    q.add_argument("--image", required=True, help="query image file: PNG, JPEG or DICOM")
    q.add_argument("-k", type=_positive_int, default=10, help="number of hits, 1 to the server's max_k")
    q.add_argument("--method", default="cnn", help="method that ranks the archive (cbmir info lists them)")
    q.add_argument("--rerank", help="method that re-orders the best --k-prep candidates")
    q.add_argument("--k-prep", type=int, default=0, help="candidates re-ranked (0: max(k, 10))")
    q.add_argument(
        "--expand", type=int, default=0, metavar="N", help="alpha query expansion over the top N hits (0: off)"
    )
    q.add_argument(
        "--reciprocal", type=int, default=0, metavar="K1", help="k-reciprocal re-ranking with k1 = K1 (0: off)"
    )
    q.add_argument(
        "--filter",
        action="append",
        metavar="FIELD=VALUE",
        help="only hits whose metadata FIELD equals VALUE (repeat; values of one field are OR-ed)",
    )
    q.add_argument(
        "--predict-class",
        action="store_true",
        help="fine-tuned methods: search only the class the model predicts (whole archive when unsure)",
    )
    q.add_argument(
        "--class-vote",
        type=int,
        default=0,
        metavar="N",
        help="with --predict-class: the query's N nearest images vote on the class beside the head (0: head only)",
    )
    _add_client_options(q, timeout=30.0)
    q.add_argument("--json", action="store_true", help="print the hits as JSON (for scripts)")
    q.add_argument("--group-by", help="metadata field: the best k groups (e.g. patient_id: k different patients)")
    q.add_argument("--group-size", type=int, default=0, help="hits per group with --group-by (0: 1)")
    q.add_argument("--max-distance", type=float, help="only hits at most this far (fewer than k is fine)")
    q.add_argument("--offset", type=int, default=0, help="skip this many hits (groups): the next page")
    q.add_argument("--columns", type=_csv, help="metadata fields to show, comma-separated (default: all)")
    q.set_defaults(func=cmd_query)
    q.epilog = "The bearer token, when the server needs one, is read from the CBMIR_TOKEN environment variable."

    u = sub.add_parser(
        "ui",
        help="a local web page over a running server: search by image or id, see the hits",
        formatter_class=HelpFormatter,
    )
    u.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of a running cbmir serve")
    u.add_argument("--host", default="127.0.0.1", help="address the page binds (keep 127.0.0.1 unless you mean it)")
    u.add_argument("--port", type=int, default=8080, help="port of the page")
    u.add_argument("--eval", help="a cbmir eval --json result to show at /eval (per-class P@k, worst queries)")
    u.add_argument("--max-upload-mb", type=int, default=32, help="largest query upload accepted")
    _add_client_options(u, timeout=30.0)
    u.set_defaults(func=cmd_ui)
    u.epilog = "The server's bearer token is read from CBMIR_TOKEN and never reaches the browser."

    d = sub.add_parser(
        "demo",
        help="index the DICOM files of pydicom-data, serve them and query (offline)",
        formatter_class=HelpFormatter,
    )
    d.add_argument("--out", default=os.path.join("bundles", "demo"), help="bundle directory the demo writes")
    _add_device(d)
    d.set_defaults(func=cmd_demo)
    return parser


USAGE_ERROR = 2
FAILURE = 1


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """Exit code and one-line message for an exception that ends a command.

    Usage errors (bad arguments, a server's ``INVALID_ARGUMENT``/``NOT_FOUND``) exit 2, failures 1.
    """
    from cbmir.errors import NotFoundError

    status = getattr(exc, "status", None)
    if isinstance(status, str):  # a RetrievalError: the server's status and message
        code = USAGE_ERROR if status in ("INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE") else FAILURE
        return code, f"{status}: {getattr(exc, 'message', exc)}"
    if isinstance(exc, InvalidInputError | NotFoundError):
        return USAGE_ERROR, str(exc)
    if isinstance(exc, CbmirError):
        return FAILURE, str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        hint = "; free space or write elsewhere" if exc.errno == errno.ENOSPC else ""
        return FAILURE, f"{where}{exc.strerror or exc}{hint}"
    return FAILURE, f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback"


def configure_logging(verbose: int) -> None:
    """cbmir's own progress at INFO; other libraries (faiss's loader, timm, grpc) only warnings unless -v -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("cbmir").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    debug = args.debug or os.environ.get("CBMIR_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        code, message = describe_failure(exc)
        print("error: " + " ".join(message.split()), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
