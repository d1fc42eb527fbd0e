"""Whole list and map columns of a ``predictions`` frame at once, through Arrow: the headline
numbers (``findings.metrics``) and the report's run-wide sections read every row, so none
walks the rows in Python.

A column may hold Arrow data (``pd.ArrowDtype``, as ``read_table(..., nested_as_arrow=True)``
gives it: no Python object per cell) or object cells (arrays, lists; None or NaN: none). Each
function gives what the per-cell helpers of ``formatting`` (``names``) and
``data.sources.attribute_pairs`` would, cell by cell: items as strings (a null item as
``"None"``, as ``str`` writes it), a null or NaN cell as an empty one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

STRINGS = pa.list_(pa.string())
PAIRS = pa.map_(pa.string(), pa.string())


def arrow_array(column: pd.Series, kind: pa.DataType) -> pa.Array:
    """A list or map column as one Arrow array of type ``kind``."""
    data = pa.array(column, type=kind, from_pandas=True)
    return data.combine_chunks() if isinstance(data, pa.ChunkedArray) else data


def arrow_lists(column: pd.Series) -> pa.ListArray:
    """A column of lists of strings as one Arrow array."""
    return arrow_array(column, STRINGS)


def _lookup(column: pd.Series, values: Iterable[str | None]) -> tuple[pa.Array | pa.ChunkedArray, pa.Array] | None:
    """``column`` and ``values`` as Arrow arrays of one type for a hash lookup (``values`` in one
    chunk); None when either is empty."""
    value_set = pa.array(values if isinstance(values, pd.Series) else list(values), from_pandas=True)
    haystack = pa.array(column, from_pandas=True)
    if len(value_set) == 0 or len(haystack) == 0:
        return None
    if isinstance(value_set, pa.ChunkedArray):
        value_set = value_set.combine_chunks()
    if value_set.type != haystack.type:
        value_set = value_set.cast(haystack.type)
    return haystack, value_set


def _as_numpy(found: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return found.to_numpy(zero_copy_only=False) if isinstance(found, pa.Array) else np.asarray(found)


def is_in(column: pd.Series, values: Iterable[str | None]) -> np.ndarray:
    """``column.isin(values)`` for a string column, as a bool array: Arrow's hash lookup of each
    cell in the set ``values`` (a null cell is in it when ``values`` holds a null).

    pandas' own ``isin`` on an Arrow string column builds a Python scalar per *value*: for the
    million image ids of a large audit, ~360 MB and seconds; this holds the ids as Arrow data."""
    if (arrays := _lookup(column, values)) is None:
        return np.zeros(len(column), dtype=bool)
    haystack, value_set = arrays
    return _as_numpy(pc.fill_null(pc.is_in(haystack, value_set=value_set, skip_nulls=False), False))


def image_positions(column: pd.Series, ids: pd.Series) -> np.ndarray:
    """Each cell's position in ``ids`` (distinct strings; the first, were one repeated), -1 for a
    cell not among them: Arrow's hash lookup, as :func:`is_in`, no Python string per id (a pandas
    index of a million string ids builds an object array and a hash table: ~110 MB)."""
    if (arrays := _lookup(column, ids)) is None:
        return np.full(len(column), -1, dtype=np.int64)
    haystack, value_set = arrays
    return _as_numpy(pc.fill_null(pc.index_in(haystack, value_set=value_set), -1)).astype(np.int64, copy=False)


def rows_where(frame: pd.DataFrame, keep: pd.Series | np.ndarray) -> pd.DataFrame:
    """``frame[keep]``, or ``frame`` itself when every row is kept: a boolean selection copies
    every column (the readable rows of a million-image run's predictions: ~470 MB), and the
    readers of these frames never modify them (pandas' copy-on-write guards the rest)."""
    mask = np.asarray(keep, dtype=bool)
    return frame if mask.all() else frame[mask]


def object_cells(column: pd.Series) -> pd.Series:
    """A list or map column with object cells, as ``read_table`` gives it by default (the
    column itself when it has them already)."""
    if not isinstance(column.dtype, pd.ArrowDtype):
        return column
    cells = arrow_array(column, column.dtype.pyarrow_dtype).to_pandas().to_numpy(dtype=object)
    return pd.Series(cells, index=column.index, name=column.name)


def flat_items(column: pd.Series) -> tuple[np.ndarray, pa.Array]:
    """Every item of a list column, in order, and the position of the row it came from."""
    lists = arrow_lists(column)
    return pc.list_parent_indices(lists).to_numpy(), pc.fill_null(pc.list_flatten(lists), "None")


def class_codes(items: pa.Array, classes: list[str]) -> np.ndarray:
    """Each item's position in ``classes`` (the last one where a name repeats), -1 for another
    name or a null."""
    position = {name: i for i, name in enumerate(classes)}
    codes = pc.index_in(items, value_set=pa.array(list(position), pa.string()))
    found = pc.fill_null(codes, -1).to_numpy()
    return np.where(found >= 0, np.array([*position.values(), -1])[found], -1)


def class_matrix(column: pd.Series, classes: list[str]) -> np.ndarray:
    """(rows, classes) bool: which classes each list cell names (``data.labels.label_matrix``)."""
    rows, items = flat_items(column)
    codes = class_codes(items, classes)
    matrix = np.zeros((len(column), len(classes)), dtype=bool)
    known = codes >= 0
    matrix[rows[known], codes[known]] = True
    return matrix


def first_codes(column: pd.Series, classes: list[str]) -> np.ndarray:
    """Each list cell's first item as its :func:`class_codes` code (-1 for an empty or null cell)."""
    lists = arrow_lists(column)
    has = pc.fill_null(pc.list_value_length(lists), 0).to_numpy() > 0
    codes = class_codes(pc.fill_null(lists.values, "None"), classes)  # of every item, this array's or not
    out = np.full(len(lists), -1, dtype=np.int64)
    out[has] = codes[lists.offsets.to_numpy()[:-1][has]]
    return out


@dataclass(frozen=True)
class AttributePairs:
    """An ``attributes`` column as one entry per (image, key): the image's position ``row``,
    ``key`` and ``value`` as codes into ``keys`` and ``values`` (value -1: null). A key repeated
    in a cell keeps its last value, as a dict of the cell's pairs does."""

    row: np.ndarray
    key: np.ndarray
    value: np.ndarray
    keys: list[str]
    values: list[str]


def _last_of_each(entry: np.ndarray) -> np.ndarray | None:
    """A mask of each value's last occurrence in ``entry``, or None when no value repeats.

    ``entry`` (an image's position times the number of keys, plus the key's code) is
    nondecreasing in the position, so it repeats nowhere when it strictly increases: the
    common case (every cell lists distinct keys in the order they first appear, e.g. the same
    keys in every cell) needs no hash table and no sort.
    Otherwise a stable sort puts each value's occurrences side by side in their order, and
    every occurrence followed by an equal one is dropped (a hash table of ~3M entries, as
    pandas' ``duplicated`` builds, held ~68 MB; the sort's index ~23 MB)."""
    if len(entry) < 2 or bool((entry[1:] > entry[:-1]).all()):
        return None
    order = np.argsort(entry, kind="stable")
    ordered = entry[order]
    repeated = ordered[1:] == ordered[:-1]
    if not repeated.any():
        return None
    last = np.ones(len(entry), dtype=bool)
    last[order[:-1][repeated]] = False
    return last


def attribute_pairs_of(column: pd.Series) -> AttributePairs:
    """The (image, key, value) entries of an ``attributes`` column (see :class:`AttributePairs`)."""
    pairs = arrow_array(column, PAIRS)
    offsets = pairs.offsets.to_numpy()  # into the keys and items of every cell, this array's or not
    spans = np.diff(offsets)
    row = np.repeat(np.arange(len(pairs)), spans)
    if pairs.null_count:  # a null cell's span (if any) holds no pairs of its own
        mine = np.repeat(pairs.is_valid().to_numpy(zero_copy_only=False), spans)
        at = pa.array(np.arange(offsets[0], offsets[-1])[mine])
        keys, values, row = pc.dictionary_encode(pairs.keys.take(at)), pc.dictionary_encode(pairs.items.take(at)), row[mine]
    else:  # every cell's pairs, in place (no index array, no copy of the strings)
        span = slice(int(offsets[0]), int(offsets[-1]))
        keys, values = pc.dictionary_encode(pairs.keys[span]), pc.dictionary_encode(pairs.items[span])
    key = keys.indices.to_numpy().astype(np.int64)
    value = pc.fill_null(values.indices, -1).to_numpy().astype(np.int64)
    last = _last_of_each(row * max(len(keys.dictionary), 1) + key)
    if last is not None:
        row, key, value = row[last], key[last], value[last]
    return AttributePairs(row, key, value, keys.dictionary.to_pylist(), values.dictionary.to_pylist())
