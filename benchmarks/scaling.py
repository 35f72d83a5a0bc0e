"""How search latency, build time, memory and recall@10 change as the archive grows from 10^3 to 10^6 vectors.

    python -m cbmir.benchmarks.scaling --index bundles/mednist-fast [--method cnn] [--sizes 1000,10000,100000,1000000]

Vectors are real MedNIST descriptors from the bundle, grown past the archive size by jittering real vectors
(Gaussian noise whose norm is a fraction of the median nearest-neighbour distance, renormalised), so neighbourhoods keep the
structure of real data; uniform random vectors would make recall meaningless. Queries are jittered copies of held-out
archive vectors. Latency is one query per call (as the service searches), median over ``--queries``; recall@10 is
against exact flat search; memory is the serialised index size (what the process holds for it).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import faiss
import numpy as np

from cbmir.index_build import load_bundle
from cbmir.index_build.index_types import apply_search_params, build_index

from .common import add_io_args, environment, write_result

INDEX_TYPES = ("flat", "ivf", "hnsw", "sq8", "ivfpq", "itq")
SWEEP = {
    "ivf": ("nprobe", (16, 64, 256)),
    "ivfpq": ("nprobe", (16, 64, 256)),
    "hnsw": ("efSearch", (64, 256, 1024)),
    "itq": ("k_factor", (10, 50, 200)),
}
"""Search-time settings tried on each built index (no rebuild needed)."""


def time_queries(index: faiss.Index, queries: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
    for q in queries[:10]:
        index.search(q[None], 10)
    lat, got = [], []
    for q in queries:
        t1 = time.perf_counter()
        _, ids = index.search(q[None], 10)
        lat.append((time.perf_counter() - t1) * 1000)
        got.append(ids[0])
    return lat, got


def grow(base: np.ndarray, n: int, sigma: float, rng: np.random.Generator, normalise: bool) -> np.ndarray:
    """``n`` vectors: the real ones first, then jittered copies of randomly chosen real ones."""
    if n <= len(base):
        return np.ascontiguousarray(base[rng.choice(len(base), n, replace=False)])
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    out[: len(base)] = base
    for start in range(len(base), n, 100_000):
        stop = min(start + 100_000, n)
        src = base[rng.integers(0, len(base), stop - start)]
        out[start:stop] = src + sigma * rng.standard_normal(src.shape, dtype=np.float32)
    if normalise:
        out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def median_nn_distance(x: np.ndarray, sample: int = 500) -> float:
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    d, _ = index.search(x[:sample], 2)
    return float(np.median(np.sqrt(d[:, 1])))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="bundles/mednist-fast")
    parser.add_argument("--method", default="cnn")
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--types", default=",".join(INDEX_TYPES))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--jitter", type=float, default=0.5, help="noise, as a fraction of the median NN distance")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads while searching (one per request)")
    add_io_args(parser, "scaling.json")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.index, verify=False)
    info = bundle.methods[args.method]
    metric = "cosine" if info.metric == "cosine" else "l2"
    normalise = bool(np.allclose(np.linalg.norm(info.descriptors[:100], axis=1), 1.0, atol=1e-3))
    rng = np.random.default_rng(0)
    base = np.array(info.descriptors, dtype=np.float32)
    perm = rng.permutation(len(base))
    held_out, base = base[perm[: args.queries]], base[perm[args.queries :]]
    # Per-coordinate noise whose expected norm is ``jitter`` x the median nearest-neighbour distance.
    sigma = args.jitter * median_nn_distance(base) / np.sqrt(base.shape[1])
    queries = grow(held_out, args.queries, 0.0, rng, normalise)
    queries = queries + sigma * rng.standard_normal(queries.shape, dtype=np.float32)
    if normalise:
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(f"{args.method}: {info.dim}-d {metric} descriptors, {len(base)} real, jitter sigma {sigma:.4f}")

    runs: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        data = grow(base, n, sigma, rng, normalise)
        faiss.omp_set_num_threads(max(1, faiss.omp_get_max_threads()))
        exact, _ = build_index(data, metric, "flat")
        _, truth = exact.search(queries, 10)
        for index_type in args.types.split(","):
            faiss.omp_set_num_threads(max(2, faiss.omp_get_max_threads()))
            t0 = time.perf_counter()
            if index_type == "flat":
                index, params = exact, {}
            else:
                index, params = build_index(data, metric, index_type)
            build_s = time.perf_counter() - t0
            memory = int(faiss.serialize_index(index).nbytes)
            faiss.omp_set_num_threads(args.threads)
            name, values = SWEEP.get(index_type, (None, (None,)))
            for value in values:
                if name is not None:
                    params = {**params, name: value}
                    apply_search_params(index, index_type, params)
                lat, got = time_queries(index, queries)
                recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)]))
                run = {
                    "index_type": index_type,
                    "metric": metric,
                    "n": n,
                    "dim": info.dim,
                    "p50_ms": round(float(np.median(lat)), 4),
                    "p99_ms": round(float(np.percentile(lat, 99)), 4),
                    "recall_at_10": round(recall, 4),
                    "memory_bytes": memory,
                    "build_s": round(build_s, 3),
                    "params": dict(params),
                    "search_threads": args.threads,
                }
                runs.append(run)
                setting = f"{name}={value}" if name else ""
                print(
                    f"n={n:>8} {index_type:<6} {setting:<14} p50 {run['p50_ms']:8.3f} ms  recall@10 {recall:.3f}  "
                    f"mem {memory / 2**20:8.1f} MiB  build {build_s:7.2f} s",
                    flush=True,
                )
        del data, exact
    doc = {
        "runs": runs,
        "meta": {
            **environment(),
            "bundle": args.index,
            "method": args.method,
            "queries": args.queries,
            "jitter_fraction_of_median_nn": args.jitter,
            "sigma": sigma,
        },
    }
    print(f"wrote {write_result(args.out, doc)}")
    return doc


if __name__ == "__main__":
    main()
