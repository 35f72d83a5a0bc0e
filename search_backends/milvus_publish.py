"""``cbmir publish``: a bundle's vectors and metadata into Milvus, idempotent, switched atomically for readers.

Every method of a bundle version goes to its own collection (``{prefix}_{method}_{version}``); a collection that
already holds exactly this version is kept, a partial one is rebuilt. Only when every method is loaded do the
aliases ``{prefix}_{method}`` move to the new collections, so a reader of an alias never sees a half-written
version. A ``cbmir serve --milvus`` process searches the collections of the very version it serves, so publishing a
newer version never changes what a running server returns; ``keep`` drops the oldest versions' collections.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cbmir.errors import InvalidInputError
from cbmir.index_build.bundle import Bundle
from cbmir.index_build.records import StringColumn

from .milvus_schema import (
    METRICS,
    alias_name,
    check_prefix,
    collection_name,
    description,
    index_params,
    metadata_fields,
    read_description,
)

log = logging.getLogger("cbmir.publish")

INSERT_BATCH = 5_000
META_PROPERTY = "cbmir.meta"
"""Collection property holding the JSON record of the bundle version (milvus-lite keeps no descriptions)."""
MAX_VARCHAR = 65_535


def connect_milvus(uri: str, token: str | None = None) -> Any:
    """A ``pymilvus.MilvusClient`` for ``uri`` (``*.db`` file: milvus-lite; ``http://host:19530``: a server).

    Raises:
        InvalidInputError: pymilvus is missing or the URI cannot be reached, naming the URI.
    """
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:
        raise InvalidInputError(
            "--milvus needs pymilvus (and milvus-lite for a .db file): pip install pymilvus"
        ) from exc
    try:
        return MilvusClient(uri=uri, token=token or "", timeout=10)
    except Exception as exc:  # pymilvus raises MilvusException, ConnectionError or its own timeouts
        raise InvalidInputError(f"cannot reach Milvus at {uri}: {type(exc).__name__}: {exc}") from exc


@dataclass
class PublishReport:
    """Collections written or kept per method, and the seconds it took."""

    collections: dict[str, str] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def publish_bundle(
    bundle: Bundle,
    client: Any,
    prefix: str = "cbmir",
    *,
    keep: int = 2,
    on_progress: Callable[[str], None] | None = None,
) -> PublishReport:
    """Load every method of ``bundle`` into Milvus and point the aliases at it.

    Args:
        bundle: the loaded bundle (its live version).
        client: a connected ``MilvusClient``.
        prefix: collection name prefix.
        keep: versions kept per method (this one included); older cbmir collections are dropped.
        on_progress: receives one line per step.
    """
    check_prefix(prefix)
    say = on_progress or log.info
    t0 = time.perf_counter()
    report = PublishReport()
    fields = metadata_fields(bundle.metadata)
    for method, info in bundle.methods.items():
        name = collection_name(prefix, method, bundle.version)
        report.collections[method] = name
        if _complete(client, name, bundle, method):
            report.reused.append(name)
            say(f"{name}: already holds version {bundle.version} ({len(bundle)} rows)")
            continue
        if client.has_collection(name):
            client.drop_collection(name)
        _create(client, name, bundle, method, fields)
        _insert(client, name, bundle, method, fields, say)
        kind, build, _ = index_params(info.index_type, info.info.get("index_params", {}), len(bundle))
        params = client.prepare_index_params()
        params.add_index("vector", index_type=kind, metric_type=METRICS[info.metric], params=build)
        client.create_index(name, params)
        client.load_collection(name)
        say(f"{name}: {len(bundle)} rows, {kind} {METRICS[info.metric]}")
    existing = set(client.list_aliases().get("aliases", []))
    for method, name in report.collections.items():
        alias = alias_name(prefix, method)
        if alias in client.list_aliases(name).get("aliases", []):
            continue
        if alias in existing:
            client.alter_alias(name, alias)
        else:
            client.create_alias(name, alias)
        say(f"alias {alias} -> {name}")
    report.dropped = _drop_old(client, prefix, bundle, keep)
    report.seconds = time.perf_counter() - t0
    return report


def collection_meta(client: Any, name: str) -> dict[str, Any] | None:
    """What cbmir recorded about a collection (its ``cbmir.meta`` property, else its description), or None."""
    described = client.describe_collection(name)
    return read_description(described.get("properties", {}).get(META_PROPERTY) or described.get("description", ""))


def _complete(client: Any, name: str, bundle: Bundle, method: str) -> bool:
    if not client.has_collection(name):
        return False
    doc = collection_meta(client, name)
    if doc is None or doc.get("bundle_version") != bundle.version or doc.get("method") != method:
        return False
    rows = int(client.get_collection_stats(name).get("row_count", -1))
    return rows == len(bundle) and bool(client.list_indexes(name))


def _create(client: Any, name: str, bundle: Bundle, method: str, fields: dict[str, str]) -> None:
    from pymilvus import DataType, MilvusClient

    info = bundle.methods[method]
    text = description(bundle.version, method, info.dim, info.metric, fields, len(bundle))
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=text)
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=info.dim)
    schema.add_field("image_id", DataType.VARCHAR, max_length=_max_length(bundle.ids))
    for column, field_name in fields.items():
        schema.add_field(field_name, DataType.VARCHAR, max_length=_max_length(bundle.metadata[column]))
    client.create_collection(name, schema=schema, description=text, properties={META_PROPERTY: text})


def _max_length(values: StringColumn) -> int:
    longest = values.max_bytes()
    if longest > MAX_VARCHAR:
        raise InvalidInputError(f"a metadata value of {longest} bytes exceeds Milvus' VARCHAR limit of {MAX_VARCHAR}")
    return max(1, longest)


def _insert(
    client: Any, name: str, bundle: Bundle, method: str, fields: dict[str, str], say: Callable[[str], None]
) -> None:
    vectors = bundle.methods[method].descriptors
    columns = {field_name: bundle.metadata[column] for column, field_name in fields.items()}
    for start in range(0, len(bundle), INSERT_BATCH):
        stop = min(len(bundle), start + INSERT_BATCH)
        block = np.asarray(vectors[start:stop], dtype=np.float32).tolist()
        ids = bundle.ids[start:stop]
        values = {f: col[start:stop] for f, col in columns.items()}
        rows = [
            {"row": start + j, "vector": block[j], "image_id": ids[j], **{f: v[j] for f, v in values.items()}}
            for j in range(stop - start)
        ]
        client.insert(name, rows)
        if (start // INSERT_BATCH) % 20 == 19:
            say(f"{name}: {stop}/{len(bundle)} rows")
    client.flush(name)


def _drop_old(client: Any, prefix: str, bundle: Bundle, keep: int) -> list[str]:
    """Drop cbmir collections of older versions beyond the newest ``keep`` per method (never an aliased one)."""
    dropped = []
    for method in bundle.methods:
        stem = f"{alias_name(prefix, method)}_v"
        mine = sorted(n for n in client.list_collections() if n.startswith(stem))
        for name in mine[: max(0, len(mine) - max(1, keep))]:
            if client.list_aliases(name).get("aliases"):
                continue
            client.drop_collection(name)
            dropped.append(name)
    return dropped


def published_collection(client: Any, uri: str, prefix: str, bundle: Bundle, method: str) -> str:
    """The collection of ``bundle``'s version of ``method``, checked against the bundle.

    Raises:
        InvalidInputError: missing, or holding another version, dimension or row count (naming URI and collection).
    """
    name = collection_name(prefix, method, bundle.version)
    fix = f"run: cbmir publish --index {bundle.path.parent} --milvus {uri} --collection {prefix}"
    if not client.has_collection(name):
        raise InvalidInputError(f"Milvus at {uri} has no collection {name} for bundle version {bundle.version}; {fix}")
    doc = collection_meta(client, name)
    info = bundle.methods[method]
    if doc is None:
        raise InvalidInputError(f"Milvus collection {name} at {uri} was not published by cbmir; {fix}")
    expected = {"bundle_version": bundle.version, "dim": info.dim, "metric": info.metric, "count": len(bundle)}
    wrong = {k: doc.get(k) for k, v in expected.items() if doc.get(k) != v}
    if wrong:
        raise InvalidInputError(
            f"Milvus collection {name} at {uri} holds {wrong}, the bundle has "
            f"{ {k: expected[k] for k in wrong} }; {fix}"
        )
    return name
