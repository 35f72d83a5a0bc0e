"""PNG plot of search latency vs archive size per index type, from ``benchmarks/results/scaling.json``."""

from __future__ import annotations

import json
from pathlib import Path

from .common import RESULTS_DIR


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default=RESULTS_DIR, help="folder holding scaling.json; the plot is written there")
    results = Path(parser.parse_args(argv).results)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads((results / "scaling.json").read_text())["runs"]
    fig, (ax_lat, ax_rec) = plt.subplots(1, 2, figsize=(12, 4.8))

    def series(run: dict) -> str:
        setting = {k: v for k, v in run["params"].items() if k in ("nprobe", "efSearch")}
        return run["index_type"] + "".join(f" {k}={v}" for k, v in setting.items())

    colours = plt.get_cmap("tab20").colors
    for i, name in enumerate(dict.fromkeys(series(r) for r in runs)):
        rows = sorted((r for r in runs if series(r) == name), key=lambda r: r["n"])
        ns = [r["n"] for r in rows]
        style = dict(marker="o", color=colours[(2 * i) % 20 + (i >= 10)], label=name)
        ax_lat.plot(ns, [r["p50_ms"] for r in rows], **style)
        ax_rec.plot(ns, [r["recall_at_10"] for r in rows], **style)
    for ax, label in ((ax_lat, "search p50 (ms, one query, 1 thread)"), (ax_rec, "recall@10 vs exact")):
        ax.set_xscale("log")
        ax.set_xlabel("archive size (vectors)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_lat.set_yscale("log")
    ax_rec.legend(fontsize=7, ncol=2)
    fig.suptitle("cbmir search scaling (MedNIST CNN descriptors, jittered to 10^6)")
    fig.tight_layout()
    out = results / "scaling.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
