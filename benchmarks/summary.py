"""Markdown summary of the benchmark result files (latency, throughput, scaling).

python -m cbmir.benchmarks.summary --results benchmarks/results > benchmarks/results/SUMMARY.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def bench_summary(res: Path) -> str:
    """Markdown summary of the latency, throughput and scaling result files in ``res``."""
    out = ["# Benchmark summary", ""]
    if (res / "latency.json").exists():
        doc = json.loads((res / "latency.json").read_text())
        meta = doc["meta"]
        out += [
            f"## Latency (gRPC end to end, {meta['archive_count']} images, top-10; {meta['cpu']}, "
            f"commit {meta['git_commit'][:10]})",
            "",
            f"Reference pipeline p50 {meta['baseline']['p50_ms']:.1f} ms ({meta['baseline']['pipeline']}).",
            "",
            "| method | concurrency | requests | p50 ms | p95 ms | p99 ms | req/s | x reference p50 | stages (median ms) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in doc["runs"]:
            stages = ", ".join(f"{k} {v}" for k, v in r["stages_ms"].items())
            out.append(
                f"| {r['method']} | {r['concurrency']} | {r['requests']} | {r['p50_ms']} | {r['p95_ms']} "
                f"| {r['p99_ms']} | {r['throughput_rps']} | {r['speedup_p50']} | {stages} |"
            )
        out.append("")
    if (res / "throughput.json").exists():
        doc = json.loads((res / "throughput.json").read_text())
        out += [
            "## Throughput (offline extraction, batched)",
            "",
            "| extractor | from bundle | input px | runtime / precision | device | images/s | reference images/s "
            "| x reference | fraction of peak |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in doc["runs"]:
            source = Path(r["bundle"]).name if r.get("bundle") else "created here"
            engine = f"{r['runtime']} / {r['precision']}" if r.get("runtime") else "-"
            peak = f"{r['fraction_of_peak']:.2f} of {r['peak_kind']}" if r.get("fraction_of_peak") else "-"
            out.append(
                f"| {r['extractor']} | {source} | {r.get('config', {}).get('image_size', '-')} | {engine} "
                f"| {r['device']} | {r['images_per_s']} | {r['baseline_images_per_s']} | {r['speedup']} | {peak} |"
            )
        out.append("")
    if (res / "scaling.json").exists():
        doc = json.loads((res / "scaling.json").read_text())
        out += [
            "## Scaling (one query, one thread; recall@10 vs exact)",
            "",
            "![scaling](scaling.png)",
            "",
            "| n | index | setting | p50 ms | p99 ms | recall@10 | memory MiB | build s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in doc["runs"]:
            setting = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k in ("nprobe", "efSearch"))
            out.append(
                f"| {r['n']} | {r['index_type']} | {setting} | {r['p50_ms']} | {r['p99_ms']} "
                f"| {r['recall_at_10']} | {r['memory_bytes'] / 2**20:.1f} | {r['build_s']} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results", help="folder of benchmark result JSON files")
    print(bench_summary(Path(parser.parse_args(argv).results)), end="")


if __name__ == "__main__":
    main()
