"""How a bundle lives in Milvus: collection and field names, index and metric mapping, filter expressions.

One collection per method, named ``{prefix}_{method}_{version}``; the alias ``{prefix}_{method}`` names the one
being served (publishing switches it atomically). Fields: ``row`` (INT64 primary key: the bundle row), ``vector``,
``image_id`` and one VARCHAR per metadata column (``m0``, ``m1``, ... in column order; a JSON record in the collection's
``cbmir.meta`` property and description maps them back and records the bundle version, method, dim and metric).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from cbmir.errors import InvalidInputError

DESCRIPTION_FORMAT = "cbmir-milvus/1"
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

INDEX_TYPES: Mapping[str, str] = MappingProxyType(
    {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW", "sq8": "IVF_SQ8", "ivfpq": "IVF_PQ", "itq": "FLAT"}
)
"""Bundle index type -> Milvus index type (ITQ has no Milvus counterpart: exact FLAT)."""

METRICS: Mapping[str, str] = MappingProxyType({"l2": "L2", "cosine": "IP", "l1": "L2"})
"""Bundle metric -> Milvus metric. Milvus has no L1: L1 methods (HOG) are searched by L2 for candidates, then
re-ranked exactly by L1 in cbmir (see :data:`L1_CANDIDATES`)."""

L1_CANDIDATES = 50
"""Candidates per wanted hit fetched by L2 for an L1 method before exact L1 re-ranking (at least 500)."""


def check_prefix(prefix: str) -> str:
    """A collection prefix Milvus accepts (letters, digits, underscores; not starting with a digit)."""
    if not NAME.match(prefix):
        raise InvalidInputError(
            f"--collection {prefix!r}: use letters, digits and underscores, starting with a letter (e.g. cbmir)"
        )
    return prefix


def alias_name(prefix: str, method: str) -> str:
    """The served name of a method's collection."""
    return f"{prefix}_{_sanitise(method)}"


def collection_name(prefix: str, method: str, version: str) -> str:
    """The collection holding one bundle version of a method."""
    return f"{alias_name(prefix, method)}_{_sanitise(version)}"


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def metadata_fields(columns: Iterable[str]) -> dict[str, str]:
    """Bundle metadata column -> Milvus field name (``m0``, ``m1``, ...; columns may hold any characters)."""
    return {column: f"m{i}" for i, column in enumerate(columns)}


def description(version: str, method: str, dim: int, metric: str, fields: Mapping[str, str], count: int) -> str:
    return json.dumps(
        {
            "format": DESCRIPTION_FORMAT,
            "bundle_version": version,
            "method": method,
            "dim": dim,
            "metric": metric,
            "count": count,
            "fields": dict(fields),
        },
        separators=(",", ":"),
    )


def read_description(text: str) -> dict[str, Any] | None:
    """The description written by :func:`description`, or None for a collection cbmir did not publish."""
    try:
        doc = json.loads(text or "")
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == DESCRIPTION_FORMAT else None


def string_literal(value: str) -> str:
    """A Milvus expression string literal that matches ``value`` exactly (quotes, backslashes escaped)."""
    return json.dumps(value, ensure_ascii=False)


def filter_expression(
    filters: Mapping[str, Iterable[str]], fields: Mapping[str, str], exclude_rows: Iterable[int] = ()
) -> str:
    """A boolean expression: every filtered field takes one of its values, and the row is not excluded.

    Field names come from the publish-time mapping (never from the request); values are escaped literals, so
    text such as ``" or 1==1 or "`` matches only itself.
    """
    clauses = []
    for name, values in sorted(filters.items()):
        literals = ", ".join(string_literal(str(v)) for v in sorted(values))
        clauses.append(f"{fields[name]} in [{literals}]")
    excluded = sorted({int(r) for r in exclude_rows})
    if excluded:
        clauses.append(f"row not in [{', '.join(str(r) for r in excluded)}]")
    return " and ".join(f"({c})" for c in clauses)


def index_params(index_type: str, params: Mapping[str, Any], count: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Milvus index type, its build parameters and its search parameters for a bundle method's index."""
    kind = INDEX_TYPES[index_type]
    nlist = int(params.get("nlist") or max(1, min(4 * int(count**0.5), max(1, count // 39))))
    if kind in ("IVF_FLAT", "IVF_SQ8"):
        return kind, {"nlist": nlist}, {"nprobe": int(params.get("nprobe", 32))}
    if kind == "IVF_PQ":
        return (
            kind,
            {"nlist": nlist, "m": int(params.get("pq_m", 8)), "nbits": 8},
            {"nprobe": int(params.get("nprobe", 32))},
        )
    if kind == "HNSW":
        return (
            kind,
            {"M": int(params.get("M", 32)), "efConstruction": int(params.get("efConstruction", 80))},
            {"ef": int(params.get("efSearch", 128))},
        )
    return kind, {}, {}
