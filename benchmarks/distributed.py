"""Scale-out components against the in-process defaults: Ray Data extraction and Milvus search.

    python -m cbmir.benchmarks.distributed --index bundles/mednist-fast [--images 2048] [--queries 200]

Extraction: the bundle's fitted extractors describe ``--images`` MedNIST files in this process and on a local Ray
with 1 and 2 extractor actors (same images, same extractors); Ray's start-up and a 64-image job give its fixed
overhead. Search: the bundle is published to a milvus-lite file and ``--queries`` stored descriptors (random rows,
one query per call, as the service searches) are answered by the FAISS backend and the Milvus backend; latency
p50/p99 per backend and recall@10 of Milvus against exact FAISS (for HOG's L1, against exact L1).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cbmir.index_build import load_bundle, open_archive
from cbmir.index_build.build import extract_archive
from cbmir.server.search_engine import SearchEngine

from .common import add_io_args, environment, percentiles, write_result


def measure_extraction(bundle_path: str, zip_path: str, images: int) -> dict[str, Any]:
    from cbmir.index_build.ray_extraction import RayOptions, extract_archive_ray, start_ray

    bundle = load_bundle(bundle_path)
    methods = {name: m.restore_extractor("cpu") for name, m in bundle.methods.items()}
    archive = open_archive(zip_path)
    picked = np.random.default_rng(0).choice(len(archive), size=images, replace=False)
    subset = archive.subset(sorted(picked.tolist()))
    t0 = time.perf_counter()
    local = extract_archive(subset, methods, batch_size=64, progress=False)
    in_process = images / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    ray = start_ray(None)
    startup_s = time.perf_counter() - t0
    runs: dict[str, Any] = {"in_process_images_per_s": round(in_process, 1), "ray_startup_s": round(startup_s, 2)}
    small = archive.subset(sorted(picked[:64].tolist()))
    t0 = time.perf_counter()
    extract_archive_ray(small, methods, RayOptions(actors=1), batch_size=64, progress=False)
    runs["ray_64_images_s"] = round(time.perf_counter() - t0, 2)
    for actors in (1, 2):
        t0 = time.perf_counter()
        out = extract_archive_ray(subset, methods, RayOptions(actors=actors), batch_size=64, progress=False)
        rate = images / (time.perf_counter() - t0)
        diff = max(float(np.abs(out.raw[n] - local.raw[n]).max()) for n in methods)
        runs[f"ray_{actors}_actors_images_per_s"] = round(rate, 1)
        runs[f"ray_{actors}_actors_max_abs_diff"] = diff
        print(f"Ray, {actors} actor(s): {rate:.1f} images/s (in-process {in_process:.1f}); max |diff| {diff:.2e}")
    ray.shutdown()
    runs.update(images=images, methods={n: m.config for n, m in bundle.methods.items()})
    return runs


def measure_search(bundle_path: str, queries: int) -> list[dict[str, Any]]:
    import faiss

    from cbmir.search_backends.milvus_backend import MilvusBackend
    from cbmir.search_backends.milvus_publish import connect_milvus, publish_bundle

    faiss.omp_set_num_threads(1)  # as `cbmir serve` searches (search_threads 1): 2 OpenMP threads on one query were
    # 3x slower here (flat, 10^6 x 128: 69 ms against 21-24 ms)
    bundle = load_bundle(bundle_path)
    local = SearchEngine(bundle, device="cpu")
    rows = np.random.default_rng(1).choice(len(bundle), size=queries, replace=False)
    timings: dict[str, dict[str, list[float]]] = {m: {"faiss": [], "milvus": []} for m in bundle.methods}
    hits: dict[str, dict[str, list[np.ndarray]]] = {m: {"faiss": [], "milvus": []} for m in bundle.methods}

    def measure(name: str, engine: SearchEngine) -> None:
        for method in bundle.methods:
            q = bundle.methods[method].descriptors[rows]
            engine.search(method, q[:1], 10)
            for i in range(len(q)):
                t0 = time.perf_counter()
                result = engine.search(method, q[i : i + 1], 10)
                timings[method][name].append((time.perf_counter() - t0) * 1000)
                hits[method][name].append(result.rows[0])

    measure("faiss", local)  # before Milvus exists: its server's background work must not slow FAISS down
    records = []
    with tempfile.TemporaryDirectory(prefix="cbmir-milvus-") as tmp:
        uri = str(Path(tmp) / "bench.db")
        client = connect_milvus(uri)
        remote_bundle = load_bundle(bundle_path, search_indexes=False)
        t0 = time.perf_counter()
        publish_bundle(remote_bundle, client, "bench")
        publish_s = time.perf_counter() - t0
        remote = SearchEngine(remote_bundle, device="cpu", backend=MilvusBackend(remote_bundle, client, uri, "bench"))
        measure("milvus", remote)
        for method in bundle.methods:
            found = hits[method]
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found["faiss"], found["milvus"])]))
            record = {
                "n": len(bundle),
                "method": method,
                "metric": bundle.methods[method].metric,
                "dim": bundle.methods[method].dim,
                "index": bundle.methods[method].index_type,
                "faiss": percentiles(timings[method]["faiss"]),
                "milvus": percentiles(timings[method]["milvus"]),
                "milvus_recall_at_10": round(recall, 4),
                "publish_s": round(publish_s, 1),
            }
            records.append(record)
            print(
                f"{method} ({record['metric']}, n={len(bundle)}): FAISS p50 {record['faiss']['p50_ms']} ms, "
                f"Milvus p50 {record['milvus']['p50_ms']} ms p99 {record['milvus']['p99_ms']} ms, recall@10 {recall:.4f}"
            )
        client.close()
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="bundles/mednist-fast", help="bundle whose extractors and vectors are used")
    parser.add_argument("--images", type=int, default=2048, help="images described per extraction run")
    parser.add_argument("--queries", type=int, default=200, help="single queries per backend and method")
    parser.add_argument("--skip-extraction", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    add_io_args(parser, "distributed.json")
    args = parser.parse_args(argv)
    doc: dict[str, Any] = {"meta": {**environment(), "bundle": args.index}}
    if not args.skip_extraction:
        doc["extraction"] = measure_extraction(args.index, args.mednist, args.images)
    if not args.skip_search:
        doc["search"] = measure_search(args.index, args.queries)
    print(f"wrote {write_result(args.out, doc)}")
    return doc


if __name__ == "__main__":
    main()
