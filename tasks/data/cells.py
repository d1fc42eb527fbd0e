"""Arrow tables as pandas frames whose list and map cells are shared among equal values.

pyarrow's ``to_pandas`` makes one Python object per cell of a list or map column: a numpy
array of one string for ``labels = ["cat"]``, a list of pairs for ``attributes``. At a
million images those cells cost 130-290 MB a column although they hold a handful of
distinct values (the classes, a few attribute combinations). :func:`to_frame` converts
each distinct value once and lets every equal cell refer to that one object: the same
cells, compared with ``==`` or read as pandas gives them, for a pointer a row.

Equal cells are found by a string key per row, built with Arrow compute: the list's length,
then its elements joined by U+001F (a map's entries as ``key U+001E U+001C value``, or
``key U+001E U+001D`` for a null value). The key determines the cell exactly when no
element holds one of the four separator characters (U+001C-U+001F) and no list element is
null; a column where either happens, or of another element type, is converted cell by
cell as before. Shared numpy cells are read-only, so that no in-place edit of one image's
cell can change another's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

SEPARATORS = "[\x1c-\x1f]"  # a regex: an element holding one of these leaves its column unshared


def to_frame(table: pa.Table, nested_as_arrow: bool = False) -> pd.DataFrame:
    """``table`` as a frame (``to_pandas``, each column freed once converted).

    List and map columns hold object cells, equal cells one shared object (list<string> and
    map<string, string> columns; others one object per cell); with ``nested_as_arrow`` they
    hold their Arrow data instead (``pd.ArrowDtype``: no Python object per cell), each as
    one Arrow chunk."""
    if nested_as_arrow:
        frame = table.to_pandas(split_blocks=True, self_destruct=True, types_mapper=_as_arrow)
        del table
        for name in frame.columns:  # one chunk a column: a vector column is then one (N, D) numpy view
            if isinstance(frame[name].dtype, pd.ArrowDtype):
                frame[name] = _one_chunk(frame[name])
        return frame
    names = table.column_names
    shared = {}
    for name in names:
        if pa.types.is_nested(table.schema.field(name).type):
            cells = shared_cells(table.column(name))
            if cells is not None:
                shared[name] = cells
    rest = table.drop_columns(list(shared))
    del table
    frame = rest.to_pandas(split_blocks=True, self_destruct=True)
    del rest
    pa.default_memory_pool().release_unused()
    if not shared:
        return frame
    return frame.assign(**{name: pd.Series(cells, index=frame.index, dtype=object) for name, cells in shared.items()})[names]


def _one_chunk(column: pd.Series) -> pd.Series | pd.arrays.ArrowExtensionArray:
    """An Arrow column's chunks joined into one; kept in chunks when its items overflow one
    array's 32-bit offsets (a million images x 2,200 classes of probabilities would)."""
    chunks = pa.chunked_array(pa.array(column))
    if chunks.num_chunks < 2:
        return column
    try:
        return pd.arrays.ArrowExtensionArray(chunks.combine_chunks())
    except pa.ArrowInvalid:  # "offset overflow while concatenating arrays"
        return column


def _as_arrow(kind: pa.DataType) -> pd.ArrowDtype | None:
    """``to_pandas``'s types mapper that keeps list and map columns as Arrow data."""
    return pd.ArrowDtype(kind) if pa.types.is_nested(kind) else None


def shared_cells(column: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """The column's cells as ``to_pandas`` makes them (None for a null cell), one object per
    distinct value; None when its type or values do not allow a key (see the module)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    keys = _row_keys(array)
    if keys is None:
        return None
    codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)  # float with NaN for nulls
    valid = ~np.isnan(codes) if codes.dtype.kind == "f" else np.ones(len(codes), bool)
    codes = codes[valid].astype(np.int64)
    distinct, first = np.unique(codes, return_index=True)  # dictionary_encode numbers values in order of appearance
    uniques = array.take(pa.array(np.flatnonzero(valid)[first])).to_pandas().to_numpy(dtype=object)
    for cell in uniques:
        if isinstance(cell, np.ndarray):
            cell.flags.writeable = False
    out = np.full(len(array), None, dtype=object)
    lookup = np.empty(distinct.max() + 1 if len(distinct) else 0, np.int64)
    lookup[distinct] = np.arange(len(distinct))
    out[valid] = uniques[lookup[codes]]
    return out


def _row_keys(array: pa.Array) -> pa.Array | None:
    """A string per row, equal for two rows exactly when their cells are equal, null for a
    null cell; None for an unsupported type or values (see the module)."""
    kind = array.type
    if pa.types.is_map(kind):
        if not (pa.types.is_string(kind.key_type) and pa.types.is_string(kind.item_type)):
            return None
        entries = array.values  # every entry, indexed by the offsets (as a slice's offsets are)
        keys, values = entries.field(0), entries.field(1)
        if _holds_separator(keys) or _holds_separator(values):
            return None
        marked = pc.coalesce(pc.binary_join_element_wise("\x1c", values, ""), "\x1d")
        elements = pc.binary_join_element_wise(keys, marked, "\x1e")
    elif pa.types.is_list(kind) and pa.types.is_string(kind.value_type):
        elements = array.values
        if elements.null_count or _holds_separator(elements):
            return None
    else:
        return None
    lists = pa.ListArray.from_arrays(array.offsets, elements, mask=array.is_null())
    lengths = pc.cast(pc.list_value_length(lists), pa.string())
    return pc.binary_join_element_wise(lengths, pc.binary_join(lists, "\x1f"), "\x1f")


def _holds_separator(strings: pa.Array) -> bool:
    """Whether any string holds one of the key's separator characters."""
    return bool(len(strings)) and bool(pc.any(pc.match_substring_regex(strings, SEPARATORS)).as_py())
