"""Offline build speed: images/s per extractor, batched, against the reference pipeline's one-at-a-time CNN.

    python -m cbmir.benchmarks.throughput [--index bundles/mednist,...] [--sizes 128,224] [--runtimes ...]

Every run of the cnn extractor (ImageNet EfficientNet-Lite0 at each ``--sizes``, each ``--runtimes`` entry) and of
HOG is created in this process, and so is the baseline; with ``--index`` the bundles' extractors are restored and
measured too, with exactly the configuration that was indexed. Each figure is the median of ``--repeats`` timed
passes after one warm-up pass. The roofline: FLOPs per image (torch's FLOP counter, multiply-add = 2) times img/s,
against this CPU's peak measured in the same run by a large matrix product (fp32 and bf16, all torch threads).
int8 calibrates on other MedNIST images than the timed ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch

from cbmir.extractors import create_extractor
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
    parser.add_argument("--index", default="", help="bundle(s) whose extractors are measured too, comma-separated")
    parser.add_argument("--sizes", default="128,224", help="cnn input sides")
    parser.add_argument(
        "--runtimes",
        default="torch/fp32,torch/bf16,onnxruntime/fp32,openvino/fp32,openvino/bf16,openvino/int8",
        help="RUNTIME/PRECISION pairs of the cnn extractor",
    )
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
    peaks = {dtype: peak_gflops(dtype, args.repeats) for dtype in ("fp32", "bf16")}
    print(f"matrix-product peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    calibration = [decode_image(b) for b in mednist_jpegs(256, seed=1, path=args.mednist)]
    runs = measure_runtimes(images, calibration, base_rate, peaks, args)
    for index in filter(None, args.index.split(",")):
        runs += measure(load_bundle(index, verify=False), images, devices, base_rate, args)
    doc = {
        "runs": runs,
        "peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "meta": {
            **environment(),
            "bundles": [i for i in args.index.split(",") if i],
            "repeats": args.repeats,
            "baseline": "torchvision squeezenet1_0 features, 256x256, avgpool 5x5, batch 1",
        },
    }
    print(f"wrote {write_result(args.out, doc)}")
    return doc


def peak_gflops(dtype: str, repeats: int, n: int = 2048) -> float:
    """This CPU's matrix-product rate (GFLOP/s) in fp32 or bf16 on all torch threads: the roofline's ceiling."""
    a = torch.randn(n, n).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    b = torch.randn(n, n).to(a.dtype)
    rate = timed_rate(lambda: torch.mm(a, b), 2 * n**3, max(repeats, 5))
    return rate / 1e9


def network_gflops(extractor: Any) -> float:
    """GFLOPs of one image through the cnn extractor's network (multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, extractor.image_size, extractor.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        extractor.network(x)
    return counter.get_total_flops() / 1e9


def measure_runtimes(
    images: list[np.ndarray],
    calibration: list[np.ndarray],
    base_rate: float,
    peaks: dict[str, float],
    args: argparse.Namespace,
) -> list[dict]:
    """img/s of HOG and of the cnn at each size, runtime and precision, with the roofline fraction."""
    runs = []
    hog = create_extractor("hog", device="cpu")
    rate = timed_rate(lambda: batched(hog, images, args.batch_size), len(images), args.repeats)
    runs.append(run_record("hog", "cpu", rate, base_rate, hog.config(), args))
    print(f"hog    cpu: {rate:8.1f} images/s  ({rate / base_rate:5.1f}x the baseline)")
    for size in (int(s) for s in args.sizes.split(",")):
        for pair in args.runtimes.split(","):
            runtime, precision = pair.split("/")
            ex = create_extractor("cnn", image_size=size, runtime=runtime, precision=precision, device="cpu")
            if ex.needs_fit:
                ex.fit(calibration)
            rate = timed_rate(lambda ex=ex: batched(ex, images, args.batch_size), len(images), args.repeats)
            gflops = network_gflops(ex)
            peak_kind = "fp32" if precision == "fp32" else "bf16"  # int8 is compared with the bf16 product
            peak = peaks[peak_kind]
            record = run_record("cnn", "cpu", rate, base_rate, ex.config(), args)
            record.update(
                runtime=runtime,
                precision=precision,
                gflops_per_image=round(gflops, 4),
                achieved_gflops_s=round(gflops * rate, 1),
                peak_gflops_s=round(peak, 1),
                peak_kind=peak_kind,
                fraction_of_peak=round(gflops * rate / peak, 3),
                forward_batch=ex.forward_batch,
            )
            runs.append(record)
            print(
                f"cnn {size}px {runtime}/{precision}: {rate:8.1f} images/s ({rate / base_rate:5.1f}x the baseline), "
                f"{gflops * rate:.0f} GFLOP/s = {100 * gflops * rate / peak:.0f}% of the {peak_kind} peak"
            )
    return runs


def batched(ex: Any, images: list[np.ndarray], batch_size: int) -> None:
    for start in range(0, len(images), batch_size):
        ex.extract(images[start : start + batch_size])


def run_record(name: str, device: str, rate: float, base_rate: float, config: dict, args: argparse.Namespace) -> dict:
    config = {k: v for k, v in config.items() if k not in ("classes", "training")}
    return {
        "extractor": name,
        "bundle": None,
        "device": device,
        "images_per_s": round(rate, 1),
        "baseline_images_per_s": round(base_rate, 1),
        "speedup": round(rate / base_rate, 2),
        "config": config,
        "images": args.images,
        "batch_size": args.batch_size,
    }


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
