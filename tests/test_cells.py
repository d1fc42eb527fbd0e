"""``cells.to_frame``: list and map cells as ``to_pandas`` gives them, one shared object per distinct value;
Arrow vector columns viewed in place; ``columns.is_in``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from visaudit.tasks.data.cells import shared_cells, to_frame
from visaudit.tasks.data.columns import PAIRS, attribute_pairs_of, is_in
from visaudit.tasks.findings.inputs import stacked

MAP = pa.map_(pa.string(), pa.string())


def _same_cell(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tolist() == b.tolist()
    return a == b and type(a) is type(b)


def _table() -> pa.Table:
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "", "a b", "é"]
    lists = [None if r == 0 else [words[w] for w in rng.integers(0, 5, r - 1)] for r in rng.integers(0, 4, 500)]
    maps = [None if r == 0 else [(f"k{w}", None if w == 4 else words[w]) for w in rng.integers(0, 5, r - 1)]
            for r in rng.integers(0, 4, 500)]
    return pa.table({
        "labels": pa.array(lists, pa.list_(pa.string())),
        "attributes": pa.array(maps, MAP),
        "scores": pa.array([[float(x)] for x in rng.random(500)], pa.list_(pa.float32())),  # not shared: one per cell
        "n": pa.array(np.arange(500)),
    })


@pytest.mark.parametrize("chunks", [1, 3], ids=["one-chunk", "three-chunks"])
def test_cells_equal_to_pandas_and_shared(chunks: int) -> None:
    table = _table()
    if chunks > 1:  # parts read together: a chunked column, the middle one a slice
        table = pa.concat_tables([table.slice(0, 100), table.slice(100, 250), table.slice(350)])
    expected, got = table.to_pandas(), to_frame(table)
    assert list(got.columns) == list(expected.columns) and got["n"].tolist() == expected["n"].tolist()
    for name in ("labels", "attributes", "scores"):
        assert all(_same_cell(a, b) for a, b in zip(expected[name], got[name])), name
    for name in ("labels", "attributes"):  # equal cells: one object
        distinct = {id(cell) for cell in got[name] if cell is not None}
        assert len(distinct) == len({repr(cell) for cell in expected[name] if cell is not None}) < 100
    assert not any(cell.flags.writeable for cell in got["labels"] if cell is not None), "a shared cell is read-only"


def test_empty_list_null_list_and_one_empty_string_stay_apart() -> None:
    column = pa.array([[], None, [""], ["", ""], [], [""]], pa.list_(pa.string()))
    assert [None if c is None else c.tolist() for c in shared_cells(column)] == [[], None, [""], ["", ""], [], [""]]
    maps = pa.array([[("k", None)], [("k", "")], [("k", None)], None, []], MAP)
    assert shared_cells(maps).tolist() == [[("k", None)], [("k", "")], [("k", None)], None, []]


def test_a_separator_or_null_element_leaves_the_column_to_pandas() -> None:
    """The row key joins elements with U+001F: an element holding it (or a null element) could
    make two different cells one key, so such a column is converted cell by cell."""
    joined = pa.array([["a\x1fb", "c"], ["a", "b\x1fc"]], pa.list_(pa.string()))
    assert shared_cells(joined) is None
    assert shared_cells(pa.array([["a", None], ["a"]], pa.list_(pa.string()))) is None
    frame = to_frame(pa.table({"labels": joined}))
    assert [c.tolist() for c in frame["labels"]] == [["a\x1fb", "c"], ["a", "b\x1fc"]]


def test_nested_as_arrow_keeps_arrow_data() -> None:
    frame = to_frame(_table(), nested_as_arrow=True)
    assert str(frame["labels"].dtype).startswith("list<") and frame["n"].dtype == np.int64


def test_nested_as_arrow_gives_one_chunk_and_vectors_viewed_in_place() -> None:
    vectors = np.arange(60, dtype=np.uint8).reshape(10, 6)
    table = pa.concat_tables([pa.table({"thumbnail": pa.array(vectors[a:b].tolist(), pa.list_(pa.uint8()))})
                              for a, b in ((0, 3), (3, 7), (7, 10))])
    frame = to_frame(table, nested_as_arrow=True)
    assert isinstance(pa.array(frame["thumbnail"]), pa.Array)  # not chunked
    whole = stacked(frame["thumbnail"], np.uint8)
    np.testing.assert_array_equal(whole, vectors)
    assert not whole.flags.writeable  # the Arrow data itself
    assert np.shares_memory(whole, stacked(frame["thumbnail"], np.uint8, np.arange(10)))
    picked = stacked(frame["thumbnail"], np.uint8, [9, 2, 2])
    np.testing.assert_array_equal(picked, vectors[[9, 2, 2]])
    assert picked.flags.writeable and not np.shares_memory(picked, whole)
    np.testing.assert_array_equal(stacked(frame["thumbnail"], np.float64), vectors.astype(np.float64))


@pytest.mark.parametrize("dtype", ["str", object])
def test_is_in_equals_pandas_isin(dtype: object) -> None:
    rng = np.random.default_rng(0)
    column = pd.Series([f"id{i}" for i in rng.integers(0, 40, 300)] + [None, None], dtype=dtype)
    for values in ({f"id{i}" for i in range(0, 40, 3)}, pd.Series([f"id{i}" for i in range(9)], dtype="str"),
                   [], ["id1", None], pd.Series(["id2", "id3"], dtype=object), ("id4",), column):
        found = is_in(column, values)
        assert found.dtype == bool
        np.testing.assert_array_equal(found, column.isin(values).to_numpy())


def test_a_list_column_too_long_for_one_chunk_stays_in_chunks() -> None:
    """Joining chunks whose items overflow 32-bit list offsets fails in Arrow: such a column keeps its chunks."""
    big = pa.ListArray.from_arrays(pa.array([0, 2**30], pa.int32()), pa.nulls(2**30))  # no value buffer: cheap
    frame = to_frame(pa.table({"v": pa.chunked_array([big, big, big])}), nested_as_arrow=True)
    assert pa.chunked_array(pa.array(frame["v"])).num_chunks == 3 and len(frame) == 3


@pytest.mark.parametrize("ordered", [False, True], ids=["any-order-repeats", "one-order"])
@pytest.mark.parametrize("nulls", [False, True], ids=["no-null-cell", "null-cells"])
def test_attribute_pairs_equal_each_cell_read_as_a_dict(nulls: bool, ordered: bool) -> None:
    """(image, key, value) entries against a plain reading of every cell as a dict (a repeated
    key keeps its last value, a null value is -1); also on a slice of a larger Arrow array, whose
    offsets do not start at 0. "one-order": every cell lists distinct keys in the order the first
    cell gives (no key repeats, no sort needed); otherwise keys come in any order and repeat within cells."""
    rng = np.random.default_rng(3)
    cells = []
    for i in range(300):
        if nulls and i and rng.random() < 0.2:
            cells.append(None)
            continue
        picked = rng.choice(["camera", "site", "light"], size=int(rng.integers(0, 5)))
        if ordered:
            picked = [k for k in ("camera", "site", "light") if i == 0 or k in set(picked)]
        cells.append([(str(k), None if rng.random() < 0.1 else f"v{int(rng.integers(0, 3))}") for k in picked])
    whole = pa.array(cells, PAIRS)
    for column in (pd.Series(whole.to_pylist(), dtype=object),
                   pd.Series(pd.arrays.ArrowExtensionArray(whole.slice(50))), pd.Series(pd.arrays.ArrowExtensionArray(whole))):
        expected = [(row, key, value) for row, cell in enumerate(column.tolist()) if cell is not None and cell is not pd.NA
                    for key, value in dict(cell).items()]
        pairs = attribute_pairs_of(column)
        got = [(int(r), pairs.keys[k], None if v < 0 else pairs.values[v]) for r, k, v in zip(pairs.row, pairs.key, pairs.value)]
        assert sorted(got, key=lambda e: (e[0], e[1])) == sorted(expected, key=lambda e: (e[0], e[1]))
