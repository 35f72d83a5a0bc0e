"""The embedded default job: index the real DICOM files that ``pydicom-data`` installs, serve them over gRPC on
localhost, and print a few query results. Needs no network and no data outside the installed packages."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from cbmir.client import RetrievalClient, format_hits
from cbmir.defaults import DEFAULT_PROJECTION_DIM, SITE_WHITEN_AUTO
from cbmir.index_build import build_bundle, open_archive
from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server

DEMO_QUERIES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("CR chest radiograph (JPEG 2000 lossy copy)", "RG1_J2KI.dcm", {}),
    ("MR slice, re-ranked by HOG", "MR2_J2KI.dcm", {"rerank": "hog", "k_prep": 20}),
    ("CT slice, only CT hits", "693_J2KR.dcm", {"filters": {"modality": "CT"}}),
)


def dicom_folder() -> Path:
    """Folder of real DICOM files shipped by the ``pydicom-data`` package."""
    try:
        import data_store
    except ImportError as exc:
        raise SystemExit("the demo needs the pydicom-data package: pip install pydicom-data") from exc
    return Path(os.path.dirname(data_store.__file__)) / "data"


def run_demo(out: Path, device: str = "auto") -> int:
    folder = dicom_folder()
    archive = open_archive(folder)
    print(f"== 1. index {len(archive)} DICOM files from {folder}")
    skipped: list[str] = []
    t0 = time.perf_counter()
    logging.getLogger("cbmir.build").setLevel(logging.ERROR)
    report = build_bundle(
        archive,
        out,
        {
            "cnn": {"image_size": 224, "pca_dim": DEFAULT_PROJECTION_DIM, "site_whiten": SITE_WHITEN_AUTO},
            "hog": {},
            "bovw": {"words": 64},
        },
        batch_size=16,
        device=device,
        on_skip=lambda s: skipped.append(f"{s['id']}: {s['error'].split(': ', 1)[-1]}"),
    )
    print(
        f"   {report.count} indexed, {len(report.skipped)} unreadable and skipped, "
        f"{time.perf_counter() - t0:.1f} s -> {report.path}"
    )
    for line in skipped:
        print(f"   skipped {line}")

    print("== 2. serve it over gRPC on localhost")
    running = start_server(ServerConfig(index=str(out), port=0, device=device), wait_ready=True)
    target = f"127.0.0.1:{running.port}"
    try:
        with RetrievalClient(target) as client:
            info = client.index_info()
            print(
                f"   {target}: {info.count} images, methods "
                + ", ".join(f"{m.name} ({m.dim}-d, {m.metric})" for m in info.methods)
                + f", health {client.health()}"
            )
            print("== 3. query it")
            for title, name, options in DEMO_QUERIES:
                t1 = time.perf_counter()
                hits = client.search_image((folder / name).read_bytes(), k=5, **options)
                ms = (time.perf_counter() - t1) * 1000
                print(f"\n-- {title}: {name} ({ms:.0f} ms)")
                print(format_hits(hits, fields=("modality", "body_region", "SeriesInstanceUID")))
    finally:
        running.stop(0)
    print(
        "\nThe same by hand: cbmir build --images DIR --out BUNDLE; cbmir serve --index BUNDLE; "
        "cbmir query --image FILE"
    )
    return 0
