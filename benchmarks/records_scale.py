"""Loading a 10^6-record bundle: ``records.parquet`` (format 2) against ``records.json`` (format 1).

    python -m cbmir.benchmarks.records_scale --index bundles/mednist-fast [--n 1000000] [--work /tmp/cbmir-records]
        [--before-python /tmp/venv-before/bin/python]

Writes a bundle of ``--n`` records built from the fast bundle's real ones (MedNIST ids, uris and metadata repeated
with a suffix, plus a ``patient_id`` field with n/8 values; cnn descriptors grown by jittered copies, as in
``scaling.py``) in format 2, and a copy whose records are format 1's JSON document. Each figure comes from a fresh
process per format and repeat (median of ``--repeats``): ``load_bundle`` seconds with and without checksum
verification, the process's RSS growth after loading (descriptors memory-mapped, ``search_indexes=False``, so the
figure is the records' own cost), the search engine's construction (filter tables over every metadata column),
the RSS of both together and one id look-up (``records_load.py``). ``--before-python`` also measures the format-1
copy with an older cbmir installation, the "before" of the columnar records:

    git worktree add /tmp/before f4cabc0 && python -m venv --system-site-packages /tmp/venv-before
    /tmp/venv-before/bin/pip install --no-deps /tmp/before

The 10^6 bundle is kept under ``--work`` for ``distributed.py --index`` (Milvus at 10^6).
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="bundles/mednist-fast", help="bundle whose records and vectors are grown")
    parser.add_argument("--n", type=int, default=1_000_000, help="records in the large bundle")
    parser.add_argument("--work", default="/tmp/cbmir-records", help="where the large bundles are written")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per format (median reported)")
    parser.add_argument(
        "--before-python",
        help="interpreter of an older cbmir install (e.g. a worktree of the commit before columnar records): also "
        "measures the format-1 copy with that code",
    )
    add_io_args(parser, "records_scale.json")
    args = parser.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    write_large_bundle(args.index, work / "v2", args.n)
    print(f"wrote {args.n} records in {time.perf_counter() - t0:.0f} s", flush=True)
    write_format_1_copy(work / "v2", work / "v1")
    doc: dict[str, Any] = {"meta": {**environment(), "bundle": args.index, "n": args.n}, "formats": {}}
    child = str(Path(__file__).with_name("records_load.py"))
    runs_of = [("records.json", sys.executable, "v1"), ("records.parquet", sys.executable, "v2")]
    if args.before_python:
        runs_of.insert(0, ("records.json, code before columnar records", args.before_python, "v1"))
    for label, python, fmt in runs_of:
        version = resolve_version_dir(work / fmt)
        records_file = RECORDS_JSON if fmt == "v1" else RECORDS_PARQUET
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([python, child, str(work / fmt)], check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        figures = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        figures["records_file_mib"] = round((version / records_file).stat().st_size / 2**20, 1)
        doc["formats"][label] = figures
        print(f"{label}: {figures}", flush=True)
    print(f"wrote {write_result(args.out, doc)}")
    return doc


if __name__ == "__main__":
    main()
