"""A bundle's records: ids, uris, metadata columns and pixel hashes, row-aligned with the descriptors.

Bundles of format 2 keep them in ``records.parquet`` (one string column per field, metadata dictionary-encoded);
loading reads Arrow buffers (about the bytes of the strings) instead of one Python object per value, so a 10^6-record
bundle loads in a fraction of the time and memory of the format-1 ``records.json`` document, which is still read.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cbmir.errors import BundleError

RECORDS_PARQUET = "records.parquet"
RECORDS_JSON = "records.json"
ID, URI, SHA256 = "id", "uri", "content_sha256"
META_PREFIX = "meta."


def records_file(format_version: int | None) -> str:
    """The records file of a bundle of this format version (format 1 kept them in JSON)."""
    return RECORDS_JSON if format_version == 1 else RECORDS_PARQUET


Row = tuple[str, str, dict[str, str], str]
"""One record as written: (id, uri, metadata, SHA-256 of the pixels)."""


class StringColumn(Sequence[str]):
    """A read-only column of strings held in Arrow memory; indexing, iteration and ``np.asarray`` work as on a list."""

    def __init__(self, values: pa.Array | pa.ChunkedArray | Sequence[str]) -> None:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
        elif not isinstance(values, pa.Array):
            values = pa.array(list(values), pa.string())
        self.values: pa.Array = values

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [v or "" for v in self.values[i].to_pylist()]
        value = self.values[int(i)].as_py()
        return "" if value is None else str(value)

    def __iter__(self) -> Iterator[str]:
        step = 65536
        for start in range(0, len(self.values), step):
            yield from (v or "" for v in self.values[start : start + step].to_pylist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringColumn):
            return bool(self.values.equals(other.values)) or list(self) == list(other)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StringColumn({len(self)} values)"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.values.to_numpy(zero_copy_only=False).astype(object)
        out[pc.is_null(self.values).to_numpy(zero_copy_only=False)] = ""
        return out if dtype is None else out.astype(dtype)

    def take(self, rows: np.ndarray) -> list[str]:
        """The values at ``rows`` (int array of shape (M,)), as a list."""
        return [v or "" for v in self.values.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()]

    def max_bytes(self) -> int:
        """Length in UTF-8 bytes of the longest value (0 when empty)."""
        if len(self.values) == 0:
            return 0
        longest = pc.max(pc.binary_length(_plain(self.values))).as_py()
        return int(longest or 0)

    def encoded(self) -> tuple[list[str], np.ndarray]:
        """(distinct values, int32 code of each row of shape (N,)): the column dictionary-encoded."""
        values = self.values if pa.types.is_dictionary(self.values.type) else pc.dictionary_encode(self.values)
        codes = values.indices.to_numpy(zero_copy_only=False)
        return [v or "" for v in values.dictionary.to_pylist()], np.asarray(codes, dtype=np.int32)


class RowOfId(Mapping[str, int]):
    """Row of each id: the ids sorted once (a permutation and a sorted copy, about 8 bytes plus the id per record),
    searched by bisection; a fraction of a Python dict's memory at 10^6 records."""

    _BATCH_MIN = 32
    """From this many ids on, :meth:`rows` bisects all of them at once in Arrow instead of one by one."""

    def __init__(self, ids: StringColumn) -> None:
        self._ids = ids

    @cached_property
    def _order(self) -> np.ndarray:
        return np.asarray(pc.sort_indices(self._ids.values), dtype=np.int64)

    @cached_property
    def _sorted(self) -> pa.Array:
        return _plain(self._ids.values).take(pa.array(self._order))

    def _sorted_id(self, position: int) -> str:
        return str(self._sorted[position].as_py())

    def __getitem__(self, id_: str) -> int:
        if not isinstance(id_, str):
            raise KeyError(id_)
        order = self._order
        pos = bisect.bisect_left(range(len(order)), id_, key=self._sorted_id)
        if pos < len(order) and self._sorted_id(pos) == id_:
            return int(order[pos])
        raise KeyError(id_)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each of ``ids`` (shape (M,)), -1 where an id is not in the bundle.

        Many ids are bisected together: about 20 vectorised Arrow comparisons in all, whatever M.
        """
        if len(ids) < self._BATCH_MIN:
            return np.array([self.get(i, -1) if isinstance(i, str) else -1 for i in ids], dtype=np.int64)
        n = len(self._order)
        if n == 0:
            return np.full(len(ids), -1, np.int64)
        queries = pa.array(list(ids), pa.string())
        lo, hi = np.zeros(len(ids), np.int64), np.full(len(ids), n, np.int64)
        while (active := lo < hi).any():
            mid = (lo + hi) // 2
            below = pc.less(self._sorted.take(pa.array(np.minimum(mid, n - 1))), queries)
            below = np.asarray(below.to_numpy(zero_copy_only=False), dtype=bool)
            lo = np.where(active & below, mid + 1, lo)
            hi = np.where(active & ~below, mid, hi)
        at = np.minimum(lo, n - 1)
        equal = pc.equal(self._sorted.take(pa.array(at)), queries).to_numpy(zero_copy_only=False)
        return np.where((lo < n) & np.asarray(equal, dtype=bool), self._order[at], -1)


@dataclass
class Records:
    """Row-aligned record columns of a bundle."""

    ids: StringColumn
    uris: StringColumn
    metadata: dict[str, StringColumn]
    content_sha256: StringColumn
    source: Path | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def row_of(self) -> RowOfId:
        return RowOfId(self.ids)

    def metadata_of(self, row: int) -> dict[str, str]:
        """The non-empty metadata fields of one row."""
        return {k: v for k, col in self.metadata.items() if (v := col[row]) != ""}

    @classmethod
    def from_rows(cls, rows: Sequence[Row]) -> Records:
        """Records of (id, uri, metadata, pixel hash) rows; a field absent from a row's metadata is empty."""
        fields = sorted({k for _, _, meta, _ in rows for k in meta})
        return cls(
            ids=StringColumn([r[0] for r in rows]),
            uris=StringColumn([r[1] for r in rows]),
            metadata={f: StringColumn([meta.get(f, "") for _, _, meta, _ in rows]) for f in fields},
            content_sha256=StringColumn([r[3] for r in rows]),
        )

    @classmethod
    def from_columns(
        cls, ids: Sequence[str], uris: Sequence[str], metadata: Mapping[str, Sequence[str]], hashes: Sequence[str] = ()
    ) -> Records:
        """Records of row-aligned columns; ``hashes`` empty means unknown pixel hashes."""
        return cls(
            StringColumn(ids),
            StringColumn(uris),
            {k: StringColumn(v) for k, v in metadata.items()},
            StringColumn(hashes or [""] * len(ids)),
        )

    def take(self, rows: np.ndarray) -> Records:
        """The records at ``rows`` (int array of shape (M,)), in that order."""
        index = pa.array(np.asarray(rows, dtype=np.int64))
        return Records(
            StringColumn(self.ids.values.take(index)),
            StringColumn(self.uris.values.take(index)),
            {k: StringColumn(c.values.take(index)) for k, c in self.metadata.items()},
            StringColumn(self.content_sha256.values.take(index)),
        )

    def concat(self, other: Records) -> Records:
        """These records followed by ``other``'s; a field only one side has is empty on the other."""

        def joined(a: StringColumn | None, b: StringColumn | None, n_a: int, n_b: int) -> StringColumn:
            parts = [_plain(a.values) if a is not None else pa.array([""] * n_a, pa.string())]
            parts.append(_plain(b.values) if b is not None else pa.array([""] * n_b, pa.string()))
            return StringColumn(pa.chunked_array(parts, pa.string()))

        n, m = len(self), len(other)
        return Records(
            joined(self.ids, other.ids, n, m),
            joined(self.uris, other.uris, n, m),
            {
                f: joined(self.metadata.get(f), other.metadata.get(f), n, m)
                for f in sorted(set(self.metadata) | set(other.metadata))
            },
            joined(self.content_sha256, other.content_sha256, n, m),
        )


def rows_by_value(column: StringColumn) -> dict[str, np.ndarray]:
    """Rows (sorted int32 arrays; int64 past 2^31 rows) holding each non-empty value of ``column``: one sort, not a
    scan per value."""
    values, codes = column.encoded()
    order = np.argsort(codes, kind="stable").astype(np.int32 if len(codes) < 2**31 else np.int64, copy=False)
    bounds = np.searchsorted(codes[order], np.arange(len(values) + 1))
    return {v: order[bounds[i] : bounds[i + 1]] for i, v in enumerate(values) if v != "" and bounds[i] < bounds[i + 1]}


def _plain(values: pa.Array) -> pa.Array:
    """A string array (dictionary-encoded columns decoded, nulls as empty strings)."""
    if pa.types.is_dictionary(values.type):
        values = values.cast(pa.string())
    return pc.fill_null(values.cast(pa.string()), "")


def write_records(path: Path, records: Records) -> None:
    """Write ``records`` to a Parquet file (zstd; metadata columns dictionary-encoded)."""
    columns = {ID: records.ids, URI: records.uris, SHA256: records.content_sha256}
    columns |= {META_PREFIX + f: c for f, c in sorted(records.metadata.items())}
    table = pa.table({name: _plain(c.values) for name, c in columns.items()})
    meta = [n for n in table.column_names if n.startswith(META_PREFIX)]
    pq.write_table(table, path, compression="zstd", use_dictionary=meta)


def read_records(path: Path, count: int) -> Records:
    """Read a bundle's records (Parquet, or the format-1 JSON document) and check they hold ``count`` rows.

    Raises:
        BundleError: naming the file, when it is unreadable, lacks a column or holds another number of rows.
    """
    try:
        if path.name == RECORDS_JSON:
            records = _read_json(path)
        else:
            records = _read_parquet(path)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise BundleError(f"{path}: unreadable records ({type(exc).__name__}: {exc})") from exc
    lengths = {len(records.ids), len(records.uris), len(records.content_sha256)}
    lengths |= {len(c) for c in records.metadata.values()}
    if lengths != {count}:
        raise BundleError(f"{path}: holds a different number of records than the manifest's {count}")
    return records


def _read_parquet(path: Path) -> Records:
    schema = pq.read_schema(path)
    meta = [n for n in schema.names if n.startswith(META_PREFIX)]
    missing = {ID, URI, SHA256} - set(schema.names)
    if missing:
        raise KeyError(f"column {sorted(missing)[0]!r} is missing")
    # The system allocator: Arrow's default (mimalloc) keeps the decompression buffers, +75% RSS at 10^6 records.
    parquet = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=meta))
    table = ds.dataset(path, format=parquet).to_table(memory_pool=pa.system_memory_pool())
    return Records(
        ids=StringColumn(table.column(ID)),
        uris=StringColumn(table.column(URI)),
        metadata={n[len(META_PREFIX) :]: StringColumn(table.column(n)) for n in meta},
        content_sha256=StringColumn(table.column(SHA256)),
        source=path,
    )


def _read_json(path: Path) -> Records:
    doc = json.loads(path.read_text())
    count = len(doc["ids"])
    return Records(
        ids=StringColumn(doc["ids"]),
        uris=StringColumn(doc["uris"]),
        metadata={k: StringColumn(v) for k, v in doc["metadata"].items()},
        content_sha256=StringColumn(doc.get("content_sha256") or [""] * count),
        source=path,
    )
