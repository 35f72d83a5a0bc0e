"""Offline build speed: images/s per extractor, batched, against the reference pipeline's one-at-a-time CNN.

    python -m cbmir.benchmarks.throughput --index bundles/mednist [--images 2048] [--repeats 3]

Extractors are restored from the bundle, so the configuration is exactly the one that was indexed. Each figure is
the median of ``--repeats`` timed passes after one warm-up pass; the baseline runs in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from cbmir.extractors.imaging import decode_image
from cbmir.index_build import load_bundle
from cbmir.server.search_engine import SearchEngine

from .common import add_io_args, environment, mednist_jpegs, write_result
from .reference_pipeline import ReferencePipeline


def timed_rate(fn, n: int, repeats: int) -> float:
    fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="bundles/mednist", help="bundle(s), comma-separated")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--baseline-images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    add_io_args(parser, "throughput.json")
    args = parser.parse_args(argv)

    images = [decode_image(b) for b in mednist_jpegs(args.images, path=args.mednist)]
    baseline = ReferencePipeline(archive_size=1)
    base_rate = timed_rate(
        lambda: baseline.throughput(images[: args.baseline_images]), args.baseline_images, args.repeats
    )
    print(f"reference pipeline (SqueezeNet 1.0, 256 px, one image per pass): {base_rate:.1f} images/s")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs = []
    for index in args.index.split(","):
        runs += measure(load_bundle(index, verify=False), images, devices, base_rate, args)
    doc = {
        "runs": runs,
        "meta": {
            **environment(),
            "bundles": args.index.split(","),
            "repeats": args.repeats,
            "baseline": "torchvision squeezenet1_0 features, 256x256, avgpool 5x5, batch 1",
        },
    }
    print(f"wrote {write_result(args.out, doc)}")
    return doc


def measure(
    bundle, images: list[np.ndarray], devices: list[str], base_rate: float, args: argparse.Namespace
) -> list[dict]:
    runs = []
    for device in devices:
        engine = SearchEngine(bundle, device=device)
        for method in engine.methods:
            ex = engine.extractor(method)

            def run(ex=ex) -> None:
                for start in range(0, len(images), args.batch_size):
                    ex.extract(images[start : start + args.batch_size])

            rate = timed_rate(run, len(images), args.repeats)
            runs.append(
                {
                    "extractor": method,
                    "bundle": str(bundle.path.parent),
                    "device": device,
                    "images_per_s": round(rate, 1),
                    "baseline_images_per_s": round(base_rate, 1),
                    "speedup": round(rate / base_rate, 2),
                    "config": ex.config(),
                    "images": len(images),
                    "batch_size": args.batch_size,
                }
            )
            print(
                f"{method:<6} {device} {bundle.path.parent.name}: {rate:8.1f} images/s  "
                f"({rate / base_rate:5.1f}x the baseline)"
            )
    return runs


if __name__ == "__main__":
    main()
