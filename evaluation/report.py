"""Markdown tables of retrieval quality from ``cbmir eval --json`` result files.

python -m cbmir.evaluation.report --results docs/results > docs/RESULTS.md
"""

from __future__ import annotations

import json
from pathlib import Path

PAPER = {  # Barać (2021), mAP = mean of P@1..P@10, on the authors' private 8,000 test queries
    "bovw": {"region": 0.7097, "modality": 0.8576, "both": 0.7022},
    "hog": {"region": 0.8249, "modality": 0.9121, "both": 0.8146},
    "cnn": {"region": 0.8845, "modality": 0.9654, "both": 0.8821},
    "cnn+hog": {"region": 0.8855, "modality": 0.9635, "both": 0.8835},
}
DATASETS = (  # result file, relevance field -> the paper's column
    ("mednist.json", {"body_region": "region", "modality": "modality", "label": "both"}),
    ("mednist-fast.json", {"body_region": "region", "modality": "modality", "label": "both"}),
    ("unifesp.json", {"label": "region"}),
    ("unifesp-qe.json", {"label": "region"}),
    ("unifesp-ssl.json", {"label": "region"}),
    ("unifesp-site-whiten.json", {"label": "region"}),
)
WORST_CLASSES = 5


def quality_table(path: Path, paper_column: dict[str, str]) -> str:
    relevances = list(paper_column)
    doc = json.loads(path.read_text())
    results = {(r["method"], r["relevance"]): r for r in doc["results"]}
    methods = list(dict.fromkeys(r["method"] for r in doc["results"]))
    head = "| method | " + " | ".join(f"{rel}: seed mAP (paper) | AP@10 | P@1" for rel in relevances) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(relevances)]
    for m in methods:
        cells = []
        for rel in relevances:
            r = results.get((m, rel))
            if r is None:
                cells += ["", "", ""]
                continue
            paper = PAPER.get(m, {}).get(paper_column[rel])
            paper_s = f" ({paper:.4f})" if paper is not None else ""
            cells += [f"{r['seed_mAP']:.4f}{paper_s}", f"{r['AP@10']:.4f}", f"{r['mP@k'][0]:.4f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    chance = [results.get((methods[0], rel), {}).get("chance_P@k") for rel in relevances]
    if any(c is not None for c in chance):
        cells = [f"{c:.4f}" if c is not None else "" for c in chance]
        lines.append("| chance (random ranking) | " + " | ".join(f"{c} | n/a | {c}" for c in cells) + " |")
    cfg = doc["config"]
    lines.append("")
    lines.append(
        f"Queries: {doc['results'][0]['queries']} ({cfg['protocol']}"
        + (f", excluding the query's own {cfg['exclude_same']}" if cfg.get("exclude_same") else "")
        + f"); re-ranking k_prep = {cfg['k_prep']}. Command: `{cfg.get('command', '')}`."
    )
    return "\n".join(lines) + "\n" + build_table(cfg)


def worst_classes_table(path: Path, relevance: str, count: int = WORST_CLASSES) -> str:
    """Per method, the ``count`` classes with the lowest P@10 and the class their top-10 hits most often wrongly are."""
    doc = json.loads(path.read_text())
    lines = [
        f"Worst classes ({relevance}; share = fraction of the class's top-10 hits):",
        "",
        "| method | class | queries | P@1 | P@10 | most confused with (share) |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        if r["relevance"] != relevance or "per_class" not in r:
            continue
        ranked = sorted(r["per_class"].items(), key=lambda item: (item[1]["P@10"], item[0]))[:count]
        for cls, figures in ranked:
            others = {c: v for c, v in r.get("confusion", {}).get(cls, {}).items() if c != cls}
            confused = max(others.items(), key=lambda item: item[1], default=None)
            shown = f"{confused[0]} ({confused[1]:.2f})" if confused else ""
            lines.append(
                f"| {r['method']} | {cls} | {figures['queries']} | {figures['P@1']:.3f} | {figures['P@10']:.3f} "
                f"| {shown} |"
            )
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""


def build_table(cfg: dict) -> str:
    build = cfg.get("build", {})
    manifest_methods = cfg.get("methods", {})
    lines = [
        "",
        f"Build on {build.get('processor', '?')} ({build.get('device', '?')}, "
        f"{build.get('torch_threads', '?')} torch threads, batch {build.get('batch_size', '?')}):",
        "",
        "| extractor | configuration | dims | metric | extract s | fit s | images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in manifest_methods.items():
        shown = {k: v for k, v in m["config"].items() if k not in ("weights_sha256", "training", "classes")}
        lines.append(
            f"| {name} | `{json.dumps(shown)}` | {m['dim']} | {m['metric']} | {m.get('extract_s', '')} "
            f"| {m.get('fit_s', '')} | {m.get('images_per_s', '')} |"
        )
    timings = build.get("timings_s", {})
    if timings:
        lines.append("")
        lines.append("Build stages (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return "\n".join(lines) + "\n"


CV_DATASETS = (
    ("unifesp-cv.json", ("label",)),
    ("unifesp-cv-qe.json", ("label",)),
    ("unifesp-cv-ssl-8epochs.json", ("label",)),
    ("unifesp-cv-ssl.json", ("label",)),
    ("unifesp-cv-ssl-all.json", ("label",)),
    ("unifesp-cv-ssl-all-224.json", ("label",)),
    ("unifesp-cv-ssl-siteshift.json", ("label",)),
    ("unifesp-cv-ssl-shift.json", ("label",)),
    ("unifesp-cv-ssl-siteshift-shift.json", ("label",)),
    ("mednist-cv.json", ("body_region", "modality", "label")),
)


def cv_results(results: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """Cross-validation result files of ``results`` with the relevances to tabulate: the curated ones of
    ``CV_DATASETS`` in that order, then any other file ``cbmir eval --cv-folds`` wrote, by name."""
    listed: list[tuple[Path, tuple[str, ...]]] = [
        (results / name, rels) for name, rels in CV_DATASETS if (results / name).exists()
    ]
    known = {name for name, _ in CV_DATASETS} | {name for name, _ in DATASETS}
    for path in sorted(results.glob("*.json")):
        if path.name in known or path.name.startswith("shift-"):
            continue
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "folds" in doc:
            listed.append((path, tuple(dict.fromkeys(r["relevance"] for r in doc.get("results", [])))))
    return listed


def cv_table(path: Path, relevances: tuple[str, ...]) -> str:
    """Cross-validation results: every method on the same held-out queries, plus per-fold training."""
    doc = json.loads(path.read_text())
    results = {(r["method"], r["relevance"]): r for r in doc["results"]}
    methods = list(dict.fromkeys(r["method"] for r in doc["results"]))
    summary = dict(doc.get("summary") or {})
    search_ms = summary.pop("search_ms_per_query", {})
    timed = " search ms/query |" if search_ms else ""
    lines = [
        "| method | " + " | ".join(f"{rel}: seed mAP | AP@10 | P@1" for rel in relevances) + " |" + timed,
        "|---|" + "---|---|---|" * len(relevances) + ("---|" if search_ms else ""),
    ]
    for m in methods:
        cells = []
        for rel in relevances:
            r = results.get((m, rel))
            cells += ["", "", ""] if r is None else [f"{r['seed_mAP']:.4f}", f"{r['AP@10']:.4f}", f"{r['mP@k'][0]:.4f}"]
        if search_ms:
            cells.append(f"{search_ms[m]:.3f}" if m in search_ms else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    cfg = doc["config"]
    reused = sum(1 for f in doc["folds"] if f.get("reused"))
    reuse_note = (
        f" ({reused} fold models reused from an earlier run of the same command: their training seconds below "
        "are that run's)"
        if reused
        else ""
    )
    lines += [
        "",
        f"{cfg['protocol']}, {cfg['archive_count']} images, each queried once against the whole archive "
        f"minus {cfg['exclude']}; {cfg.get('cpu', '?')}, {cfg.get('total_s', '?')} s in all{reuse_note}. "
        f"Command: `{cfg.get('command', '')}`.",
        "",
        "| fold | queries | training images | epochs run | best epoch | validation mAP | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in doc["folds"]:
        lines.append(
            f"| {f['fold']} | {f['queries']} | {f['train_images']} | {f.get('epochs_run', '')} "
            f"| {f.get('best_epoch', '')} | {f.get('best_val_mAP', '')} | {f.get('train_s', '')} |"
        )
    if summary:
        flat = [
            f"{k} ({', '.join(f'{inner} {v2}' for inner, v2 in v.items())})" if isinstance(v, dict) else f"{k} {v}"
            for k, v in summary.items()
        ]
        lines += ["", "Summary: " + ", ".join(flat)]
    return "\n".join(lines) + "\n"


def shift_table(path: Path) -> str:
    """P@1 and P@10 of each method unshifted and under the site shift (``cbmir eval --shift``)."""
    doc = json.loads(path.read_text())
    shift = doc["site_shift"]
    lines = [
        "| method | relevance | P@1 | P@1 shifted | drop | P@10 | P@10 shifted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in shift["results"]:
        before, after = r["unshifted"], r["shifted"]
        lines.append(
            f"| {r['method']} | {r['relevance']} | {before['P@1']:.3f} | {after['P@1']:.3f} | {r['P@1_drop']:.3f} "
            f"| {before['P@10']:.3f} | {after['P@10']:.3f} |"
        )
    methods = doc.get("config", {}).get("methods", {})
    weights = sorted(
        {str(m.get("config", {}).get("weights")) for m in methods.values() if "weights" in m.get("config", {})}
    )
    if "training" in doc.get("config", {}):
        weights.append(f"fine-tuned per fold from {doc['config']['training']['weights']}")
    lines += [
        "",
        f"Changes: {'+'.join(shift['shifts'])}; {shift['queries']} queries, seed {shift['seed']}, own "
        f"{shift.get('exclude_same') or 'image'} excluded; cnn weights: {', '.join(weights) or 'n/a'}. "
        f"Command: `{doc.get('config', {}).get('command', '')}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="docs/results", help="folder of eval result JSON files")
    results = Path(parser.parse_args(argv).results)
    print("# Retrieval quality\n")
    print("Seed mAP = mean over queries of mean(P@1..P@10), the reference paper's mAP; in brackets the paper's own")
    print("figure for the same method and relevance on its private data. AP@10 = standard average precision at 10.\n")
    for name, columns in DATASETS:
        path = results / name
        if path.exists():
            print(f"## {name.removesuffix('.json')}\n")
            print(quality_table(path, columns))
            print(worst_classes_table(path, list(columns)[-1]))
    for path, rels in cv_results(results):
        print(f"## {path.stem} (group k-fold cross-validation, fine-tuned methods)\n")
        print(cv_table(path, rels))
        if "site_shift" in json.loads(path.read_text()):
            print(shift_table(path))
    for path in sorted(results.glob("shift-*.json")):
        print(f"## {path.stem} (site shift)\n")
        print(shift_table(path))


if __name__ == "__main__":
    main()
