"""Loading a 10^6-record bundle: ``records.parquet`` (format 2) against ``records.json`` (format 1).

    python -m cbmir.benchmarks.records_scale --index bundles/mednist-fast [--n 1000000] [--work /tmp/cbmir-records]

Writes a bundle of ``--n`` records built from the fast bundle's real ones (MedNIST ids, uris and metadata repeated
with a suffix, plus a ``patient_id`` field with n/8 values; cnn descriptors grown by jittered copies, as in
``scaling.py``) in format 2, and a copy whose records are format 1's JSON document. Each figure comes from a fresh
process per format and repeat (median of ``--repeats``): ``load_bundle`` seconds with and without checksum
verification, the process's RSS growth after loading (descriptors memory-mapped, ``search_indexes=False``, so the
figure is the records' own cost), the search engine's construction (filter tables over every metadata column) and
one id look-up. The 10^6 bundle is kept under ``--work`` for ``distributed.py --index`` (Milvus at 10^6).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from cbmir.checksums import sha256_file
from cbmir.index_build import load_bundle
from cbmir.index_build.bundle import BundleWriter, resolve_version_dir
from cbmir.index_build.manifest import MANIFEST, MANIFEST_CHECKSUM, manifest_digest
from cbmir.index_build.records import RECORDS_JSON, RECORDS_PARQUET, Records, read_records

from .common import add_io_args, environment, write_result
from .scaling import grow, median_nn_distance


def write_format_1_copy(bundle_dir: Path, dst: Path) -> Path:
    """Copy a bundle, storing its records the way format 1 did (``records.json``), checksums redone."""
    shutil.copytree(bundle_dir, dst)
    version = resolve_version_dir(dst)
    manifest = json.loads((version / MANIFEST).read_text())
    records = read_records(version / RECORDS_PARQUET, manifest["count"])
    doc = {
        "ids": list(records.ids),
        "uris": list(records.uris),
        "metadata": {k: list(v) for k, v in records.metadata.items()},
        "content_sha256": list(records.content_sha256),
    }
    path = version / RECORDS_JSON
    path.write_text(json.dumps(doc, separators=(",", ":")))
    (version / RECORDS_PARQUET).unlink()
    del manifest["files"][RECORDS_PARQUET]
    manifest["files"][RECORDS_JSON] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["format_version"] = 1
    data = json.dumps(manifest, indent=2).encode()
    (version / MANIFEST).write_bytes(data)
    (version / MANIFEST_CHECKSUM).write_text(manifest_digest(data) + "\n")
    return dst


def write_large_bundle(source: str, out: Path, n: int) -> Path:
    """A format-2 bundle of ``n`` records and cnn descriptors grown from ``source``'s real ones."""
    bundle = load_bundle(source, verify=False, search_indexes=False)
    rng = np.random.default_rng(0)
    real = len(bundle)
    reps = -(-n // real)
    rows = np.arange(n) % real
    suffix = np.repeat(np.arange(reps), real)[:n].astype(str)
    ids = [f"{i}#{s}" for i, s in zip(bundle.ids.take(rows), suffix)]
    uris = [f"{u}#{s}" for u, s in zip(bundle.uris.take(rows), suffix)]
    metadata = {k: bundle.metadata[k].take(rows) for k in bundle.metadata}
    metadata["patient_id"] = [f"patient-{p:07d}" for p in rng.integers(0, max(1, n // 8), n)]
    hashes = [f"{h}{s}" for h, s in zip(bundle.content_hashes.take(rows), suffix)]
    base = np.asarray(bundle.methods["cnn"].descriptors, dtype=np.float32)
    sigma = 0.5 * median_nn_distance(base) / np.sqrt(base.shape[1])
    vectors = grow(base, n, sigma, rng, normalise=True)
    info = dict(bundle.manifest["methods"]["cnn"])
    with BundleWriter(out) as writer:
        writer.write_records(Records.from_columns(ids, uris, metadata, hashes))
        writer.write_array("cnn.npy", vectors)
        files = {"descriptors": "cnn.npy"}
        if "state" in info["files"]:
            files["state"] = info["files"]["state"]
            writer.copy_file(files["state"], bundle.path / info["files"]["state"])
        info.update(files=files, index_type="flat")
        info.pop("index_params", None)
        build = {"dicom_windows": bundle.manifest.get("build", {}).get("dicom_windows"), "grown_from": str(source)}
        return writer.commit({"count": n, "methods": {"cnn": info}, "build": build})


def measure_load(bundle_dir: str) -> dict[str, Any]:
    """One fresh process's figures for one bundle (run through ``--child``)."""
    # Imported before measuring, so the RSS figure is the records', not the code's.
    import pyarrow.dataset
    import pyarrow.parquet  # noqa: F401

    from cbmir.server.search_engine import SearchEngine

    try:
        import pandas  # noqa: F401  (pyarrow imports it on first use when it is installed)
    except ImportError:
        pass
    process = psutil.Process()
    before = process.memory_info().rss
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_dir, verify=False, search_indexes=False)
    load_s = time.perf_counter() - t0
    loaded = process.memory_info().rss
    t0 = time.perf_counter()
    SearchEngine(bundle, device="cpu")
    engine_s = time.perf_counter() - t0
    engine_rss = process.memory_info().rss
    probe = bundle.ids[len(bundle) // 3]
    t0 = time.perf_counter()
    row = bundle.row_of[probe]
    first_lookup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(100):
        bundle.row_of[probe]
    lookup_us = (time.perf_counter() - t0) / 100 * 1e6
    if row != len(bundle) // 3:
        raise SystemExit(f"{bundle_dir}: id look-up returned row {row}")
    t0 = time.perf_counter()
    load_bundle(bundle_dir, verify=True, search_indexes=False)
    verified_s = time.perf_counter() - t0
    return {
        "load_s": round(load_s, 3),
        "load_verified_s": round(verified_s, 3),
        "records_rss_mib": round((loaded - before) / 2**20, 1),
        "engine_build_s": round(engine_s, 3),
        "engine_rss_mib": round((engine_rss - loaded) / 2**20, 1),
        "first_id_lookup_s": round(first_lookup_s, 3),
        "id_lookup_us": round(lookup_us, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="bundles/mednist-fast", help="bundle whose records and vectors are grown")
    parser.add_argument("--n", type=int, default=1_000_000, help="records in the large bundle")
    parser.add_argument("--work", default="/tmp/cbmir-records", help="where the large bundles are written")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per format (median reported)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_io_args(parser, "records_scale.json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_load(args.child)))
        return {}
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    write_large_bundle(args.index, work / "v2", args.n)
    print(f"wrote {args.n} records in {time.perf_counter() - t0:.0f} s", flush=True)
    write_format_1_copy(work / "v2", work / "v1")
    doc: dict[str, Any] = {"meta": {**environment(), "bundle": args.index, "n": args.n}, "formats": {}}
    for fmt in ("v1", "v2"):
        version = resolve_version_dir(work / fmt)
        records_file = RECORDS_JSON if fmt == "v1" else RECORDS_PARQUET
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [sys.executable, "-m", "cbmir.benchmarks.records_scale", "--child", str(work / fmt)],
                check=True,
                capture_output=True,
                text=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        figures = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        figures["records_file_mib"] = round((version / records_file).stat().st_size / 2**20, 1)
        doc["formats"][records_file] = figures
        print(f"{records_file}: {figures}", flush=True)
    print(f"wrote {write_result(args.out, doc)}")
    return doc


if __name__ == "__main__":
    main()
