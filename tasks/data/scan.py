"""A whole-table read whose vector columns arrive as one Arrow chunk each, without a second copy.

A run's table is thousands of part files; a plain scan gives each list column one chunk per
part, and joining them afterwards (``combine_chunks``) holds the column twice: 190 MB more
at the read's peak for a million images' 192-byte thumbnails. Here every batch's list values
are copied, as the batches arrive, into one buffer per column sized from the first batch
(rows x that batch's list length; grown if a longer list comes), and the batch is let go.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

MAX_OFFSET = 2**31 - 1  # a list array's 32-bit offsets
SCAN_GROUP = 256  # part files per dataset scan (see scan_table)


def _is_vector(kind: pa.DataType) -> bool:
    """A list of fixed-width numbers (``signals.thumbnail``, ``probabilities``, ``embedding``)."""
    return pa.types.is_list(kind) and (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type))


class _Gathered:
    """One list column's values, offsets and nulls, filled batch by batch."""

    def __init__(self, kind: pa.ListType, rows: int) -> None:
        self.kind, self.rows = kind, rows
        self.values = np.empty(0, kind.value_type.to_pandas_dtype())
        self.filled = 0
        self.lengths: list[np.ndarray] = []
        self.nulls: list[np.ndarray] = []

    def add(self, column: pa.ListArray) -> bool:
        """Append one batch's lists; False when they hold a null item (not a vector column) or
        the column's items would overflow 32-bit offsets."""
        flat = column.flatten()  # the non-null lists' items, honouring the batch's offset
        if flat.null_count:
            return False
        items = flat.to_numpy(zero_copy_only=False)
        if self.filled + len(items) > len(self.values):  # first batch, or a longer list than planned
            width = max(1, -(-len(items) // max(1, len(column))))
            size = max(self.rows * width, self.filled + len(items))
            if size > MAX_OFFSET:
                return False
            grown = np.empty(size, self.values.dtype)
            grown[: self.filled] = self.values[: self.filled]
            self.values = grown
        self.values[self.filled : self.filled + len(items)] = items
        self.filled += len(items)
        self.lengths.append(pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False))
        self.nulls.append(column.is_null().to_numpy(zero_copy_only=False))
        return True

    def array(self) -> pa.ListArray:
        """The column as one list array (its values a view of the buffer, copied only when the
        buffer is over a tenth larger than they are: null or uneven lists)."""
        if self.filled < 0.9 * len(self.values):
            self.values = self.values[: self.filled].copy()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        nulls = np.concatenate(self.nulls) if self.nulls else np.zeros(0, bool)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(self.values[: self.filled]), type=self.kind,
                                        mask=pa.array(nulls) if nulls.any() else None)


def groups(files: list[Path], schema: pa.Schema) -> Iterator[ds.Dataset]:
    """``files`` as datasets of ``SCAN_GROUP`` files each, in file order, each made when the last
    is done with: a dataset keeps every scanned part's Parquet metadata (~80 KB a part)."""
    for start in range(0, len(files), SCAN_GROUP):
        yield ds.dataset(files[start : start + SCAN_GROUP], schema=schema, format="parquet")


def scan_table(files: list[Path], schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Every row of ``files`` (in file order) with ``schema``, only ``columns`` when given, read
    ``SCAN_GROUP`` files at a time. One dataset over thousands of parts holds every part's
    metadata until the scan ends: a million images' predictions (164 MB of Arrow data, 3,910
    parts) took 597 MB more at the read's peak in one dataset, 319 MB in datasets of 256 parts
    (64: 301 MB, 1,024: 377 MB), for 2.1 s instead of 1.5 s (this CPU, files cached)."""
    target = pa.schema([schema.field(name) for name in columns]) if columns is not None else schema
    tables = [group.to_table(columns=columns) for group in groups(files, schema)]
    return pa.concat_tables(tables) if tables else target.empty_table()


def read_whole(files: list[Path], schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Every row of ``files`` (in file order) with ``schema``, only ``columns`` when given; each
    list column of numbers is one chunk, gathered as the batches arrive (see the module). A
    column whose items would overflow 32-bit offsets (known from the first batch) or whose first
    batch holds a null item stays as a plain scan gives it (one chunk per batch); a null item in a
    later batch, or a later list long enough to overflow, reads the whole table plainly."""
    names = schema.names if columns is None else list(columns)
    vectors = [name for name in names if _is_vector(schema.field(name).type)]
    rows = sum(group.count_rows() for group in groups(files, schema)) if vectors else 0
    if not vectors or rows == 0:
        return scan_table(files, schema, names)
    gathered = _gathered(groups(files, schema), schema, names, {name: _Gathered(schema.field(name).type, rows) for name in vectors})
    # on None nothing of the abandoned scan is held any more during the plain one
    return scan_table(files, schema, names) if gathered is None else gathered


def _gathered(groups: Iterator[ds.Dataset], schema: pa.Schema, names: list[str],
              gathered: dict[str, _Gathered]) -> pa.Table | None:
    """The scan with ``gathered``'s columns copied into their buffers; None when a later batch
    fails one of them (its earlier lists are in the buffer only)."""
    rest: list[pa.RecordBatch] = []
    batches = (batch for group in groups for batch in group.to_batches(columns=names))
    for batch in batches:  # in file order, each batch let go once copied
        for name in list(gathered):
            if not gathered[name].add(batch.column(name)):
                if rest:
                    return None
                del gathered[name]  # the first batch: this column stays as the scan gives it
        rest.append(batch.drop_columns(list(gathered)))
    table = pa.Table.from_batches(rest, schema=pa.schema([schema.field(n) for n in names if n not in gathered]))
    for name in names:
        if name in gathered:
            table = table.add_column(names.index(name), schema.field(name), gathered[name].array())
    return table.replace_schema_metadata(schema.metadata)
