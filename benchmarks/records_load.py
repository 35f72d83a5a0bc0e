"""One fresh process's figures for loading one bundle; run by ``records_scale.py`` as a script, so that an older
cbmir installation (another interpreter) can be measured the same way.

    python benchmarks/records_load.py BUNDLE_DIR   # prints one JSON line
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import psutil


def measure_load(bundle_dir: str) -> dict[str, Any]:
    """Seconds and RSS growth of ``load_bundle`` (descriptors memory-mapped), of the search engine built over it
    (filter tables over every metadata column), and of id look-ups."""
    try:  # imported before measuring, so the RSS figures are the data's, not the code's
        import pandas  # noqa: F401
        import pyarrow.dataset
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        pass
    from cbmir.index_build import load_bundle
    from cbmir.server.search_engine import SearchEngine

    process = psutil.Process()
    before = process.memory_info().rss
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_dir, verify=False, search_indexes=False)
    load_s = time.perf_counter() - t0
    loaded = process.memory_info().rss
    t0 = time.perf_counter()
    engine = SearchEngine(bundle, device="cpu")
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
    total = process.memory_info().rss
    del engine
    t0 = time.perf_counter()
    load_bundle(bundle_dir, verify=True, search_indexes=False)
    verified_s = time.perf_counter() - t0
    return {
        "load_s": round(load_s, 3),
        "load_verified_s": round(verified_s, 3),
        "records_rss_mib": round((loaded - before) / 2**20, 1),
        "engine_build_s": round(engine_s, 3),
        "engine_rss_mib": round((engine_rss - loaded) / 2**20, 1),
        "total_rss_mib": round((total - before) / 2**20, 1),
        "first_id_lookup_s": round(first_lookup_s, 3),
        "id_lookup_us": round(lookup_us, 1),
    }


if __name__ == "__main__":
    print(json.dumps(measure_load(sys.argv[1])))
