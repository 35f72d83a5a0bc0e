"""10^7 vectors on one machine, in-process: build time, bytes per vector, p50/p99, recall@10 and RSS per index type.

    python -m cbmir.benchmarks.large_scale --index bundles/mednist-fast [--n 10000000] [--index-type ivf|ivfpq]
        [--nprobe 8,16,32,64]

Vectors are the fast bundle's real 128-d cnn descriptors grown by jittered copies, as in ``scaling.py``; queries
are jittered held-out vectors; the truth is exact search over the same vectors (``faiss.knn``, no copy). The
vectors are freed once the index holds them, so the RSS printed while searching is what a server holding this
index needs. One query per call on one thread, as the service searches.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import faiss
import numpy as np
import psutil

from cbmir.index_build import load_bundle
from cbmir.index_build.index_types import build_index

from .common import add_io_args, environment, percentiles, write_result
from .scaling import grow, median_nn_distance


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="bundles/mednist-fast")
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nprobe", default="8,16,32,64")
    parser.add_argument("--jitter", type=float, default=0.5)
    parser.add_argument("--index-type", choices=("ivf", "ivfpq"), default="ivf", help="IVF-Flat or IVF-PQ (32 bytes)")
    add_io_args(parser, "large_scale.json")
    args = parser.parse_args(argv)

    info = load_bundle(args.index, verify=False).methods["cnn"]
    rng = np.random.default_rng(0)
    base = np.array(info.descriptors, dtype=np.float32)
    perm = rng.permutation(len(base))
    held_out, base = base[perm[: args.queries]], base[perm[args.queries :]]
    sigma = args.jitter * median_nn_distance(base) / np.sqrt(base.shape[1])
    queries = held_out + sigma * rng.standard_normal(held_out.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    t0 = time.perf_counter()
    data = grow(base, args.n, sigma, rng, normalise=True)
    print(
        f"{args.n} x {data.shape[1]} vectors in {time.perf_counter() - t0:.0f} s, RSS {rss_gib():.1f} GiB", flush=True
    )
    faiss.omp_set_num_threads(2)
    t0 = time.perf_counter()
    _, truth = faiss.knn(queries, data, 10)
    print(f"exact truth in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    index, params = build_index(data, "l2", args.index_type)
    build_s = time.perf_counter() - t0
    del data
    nlist = int(faiss.extract_index_ivf(index).nlist)
    code_bytes = info.dim * 4 if args.index_type == "ivf" else int(params["pq_m"])
    bytes_per_vector = (index.ntotal * (code_bytes + 8) + nlist * info.dim * 4) / args.n  # codes + ids + centroids
    print(
        f"{args.index_type} {params} built in {build_s:.0f} s, {bytes_per_vector:.0f} B/vector, RSS {rss_gib():.1f} GiB"
    )
    faiss.omp_set_num_threads(1)
    runs: list[dict[str, Any]] = []
    for nprobe in (int(v) for v in args.nprobe.split(",")):
        faiss.extract_index_ivf(index).nprobe = nprobe
        index.search(queries[:1], 10)
        lat, got = [], []
        for q in queries:
            t0 = time.perf_counter()
            _, rows = index.search(q[None, :], 10)
            lat.append((time.perf_counter() - t0) * 1000)
            got.append(rows[0])
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)]))
        run = {"nprobe": nprobe, **percentiles(lat), "recall_at_10": round(recall, 4), "rss_gib": round(rss_gib(), 2)}
        runs.append(run)
        print(
            f"nprobe {nprobe}: p50 {run['p50_ms']} ms p99 {run['p99_ms']} ms recall@10 {recall:.4f} RSS {run['rss_gib']}"
        )
    doc = {
        "n": args.n,
        "dim": info.dim,
        "index": args.index_type,
        "params": params,
        "build_s": round(build_s, 1),
        "bytes_per_vector": round(bytes_per_vector, 1),
        "runs": runs,
        "meta": {**environment(), "bundle": args.index, "queries": args.queries, "sigma": sigma},
    }
    print(f"wrote {write_result(args.out, doc)}")
    return doc


if __name__ == "__main__":
    main()
