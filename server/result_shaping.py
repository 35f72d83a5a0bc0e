"""One hit per patient or study, distance cut-offs and pages, exactly as if the whole archive were ranked first.

The archive is ranked by the engine (with filters and exclusions as asked), ties broken by id; the
ranking is then cut at ``max_distance``, grouped by a metadata field (each group placed by its best hit and keeping
its best ``group_size`` hits) and paged with ``offset``. Only a prefix of the ranking is fetched: it grows until it
provably holds every hit the answer needs (a group's missing members could only lie beyond it if the group has more
members than it shows; equal distances at the prefix's end are fetched too). With a re-ranker the ranking is its
``k_prep`` re-sorted candidates (at least offset + k), and those are shaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cbmir.search_backends import Allowed, allowed_mask

from .search_engine import SearchEngine


@dataclass(frozen=True)
class Shaping:
    """How to shape a ranking: ``group_by`` field (empty: no grouping), hits per group, cut-off and page start."""

    group_by: str = ""
    group_size: int = 1
    max_distance: float | None = None
    offset: int = 0

    @property
    def active(self) -> bool:
        return bool(self.group_by) or self.max_distance is not None or self.offset > 0


@dataclass
class ShapedHits:
    """One query's answer: archive rows, distances, 1-based ranks and group values (all the same length)."""

    rows: list[int]
    distances: list[float]
    ranks: list[int]
    groups: list[str]


def _group_key(value: str, row: int) -> str:
    return value if value != "" else f"\x00row{row}"  # images without the field form groups of their own


def _shape_one(
    rows: np.ndarray,
    dists: np.ndarray,
    ids: Sequence[str],
    column: Sequence[str] | None,
    k: int,
    shaping: Shaping,
    group_sizes: dict[str, int] | None,
    exhausted: bool,
) -> ShapedHits | None:
    """The answer from one query's ranking prefix, or None when the prefix is too short to be sure."""
    valid = rows >= 0
    rows, dists = rows[valid], dists[valid]
    order = np.lexsort((np.asarray([ids[r] for r in rows], dtype=object).astype(str), dists))
    rows, dists = rows[order], dists[order]
    last = float(dists[-1]) if len(dists) else np.inf
    if shaping.max_distance is not None:
        inside = dists <= shaping.max_distance
        exhausted = exhausted or not inside.all()
        rows, dists = rows[inside], dists[inside]
    need = shaping.offset + k
    if column is None:
        if len(rows) >= need and (exhausted or float(dists[need - 1]) < last):
            pass
        elif not exhausted:
            return None
        keep = slice(shaping.offset, need)
        picked_rows, picked_d = rows[keep].tolist(), dists[keep].tolist()
        ranks = list(range(shaping.offset + 1, shaping.offset + 1 + len(picked_rows)))
        return ShapedHits(picked_rows, picked_d, ranks, [""] * len(picked_rows))
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows.tolist()):
        key = _group_key(column[r], r)
        members = groups.setdefault(key, [])
        if len(members) < shaping.group_size:
            members.append(i)
    chosen = list(groups.items())[:need]
    if not exhausted:
        complete = len(chosen) == need and all(
            len(members) >= min(shaping.group_size, (group_sizes or {}).get(key, 1)) for key, members in chosen
        )
        used = [i for _, members in chosen for i in members]
        if not complete or not used or float(dists[max(used)]) >= last:
            return None
    out = ShapedHits([], [], [], [])
    for g, (key, members) in enumerate(chosen[shaping.offset :], start=shaping.offset + 1):
        for i in members:
            out.rows.append(int(rows[i]))
            out.distances.append(float(dists[i]))
            out.ranks.append(g)
            out.groups.append("" if key.startswith("\x00row") else key)
    return out


def shaped_search(
    engine: SearchEngine,
    method: str,
    queries: np.ndarray,
    k: int,
    shaping: Shaping,
    *,
    allowed: Allowed = None,
    exclude: Sequence[np.ndarray] | None = None,
    **search: Any,
) -> list[ShapedHits]:
    """Search and shape each query's ranking (see the module docstring); ``search`` passes re-ranking options.

    Returns:
        One :class:`ShapedHits` per query row.
    """
    n = len(engine.bundle)
    column = engine.bundle.metadata[shaping.group_by] if shaping.group_by else None
    group_sizes = None
    if column is not None:
        selected = allowed_mask(allowed)
        mask = np.ones(n, bool) if selected is None else selected
        values, counts = np.unique(np.asarray(column, dtype=object)[mask].astype(str), return_counts=True)
        group_sizes = dict(zip(values.tolist(), counts.tolist()))
    need = (shaping.offset + k) * (shaping.group_size if column is not None else 1)
    fetch = min(n, max(2 * need, 16))
    reranked = search.get("rerank") is not None or search.get("reciprocal") is not None
    if reranked:  # the ranking is the k_prep candidates re-sorted: shape exactly those
        fetch = min(n, max(search.get("k_prep") or 0, shaping.offset + k))
    answers: list[ShapedHits | None] = [None] * len(queries)
    while True:
        todo = [i for i, a in enumerate(answers) if a is None]
        kwargs = dict(search)
        if kwargs.get("rerank_queries") is not None:
            kwargs["rerank_queries"] = kwargs["rerank_queries"][todo]
            kwargs["k_prep"] = fetch
        result = engine.search(
            method,
            queries[todo],
            fetch,
            allowed=allowed,
            exclude=None if exclude is None else [exclude[i] for i in todo],
            **kwargs,
        )
        for j, i in enumerate(todo):
            exhausted = reranked or fetch >= n or bool((result.rows[j] < 0).any())
            answers[i] = _shape_one(
                result.rows[j], result.distances[j], engine.bundle.ids, column, k, shaping, group_sizes, exhausted
            )
        if all(a is not None for a in answers):
            return [a for a in answers if a is not None]
        fetch = min(n, fetch * 4)
