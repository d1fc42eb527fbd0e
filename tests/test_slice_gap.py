"""The slice tables behind ``slice_gap``, ``group_gap`` and ``error_slice``, built from attribute
codes: checked cell by cell against the images' own attribute dicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa

from visaudit.tasks.data.cells import to_frame
from visaudit.tasks.findings.slice_gap import attribute_table, slice_table


def _audited() -> pd.DataFrame:
    cells = [None, [], [("bg", None)], {"bg": "blue", "site": "A"}, [("site", "1"), ("bg", "green"), ("site", "Z")],
             [("bg", "blue")], [("bg", "green")], [("site", "A")]]
    return pd.DataFrame({
        "image_id": [f"i{k}" for k in range(len(cells))],
        "correct": [True, False, None, True, False, True, True, False],
        "confidence": np.linspace(0.1, 0.9, len(cells)),
        "attributes": cells,
    }, index=np.arange(len(cells)) * 3)  # not a range index: rows stay the audited images'


def _expected(cell: object, key: str) -> object:
    pairs = dict(cell.items() if isinstance(cell, dict) else (cell or []))
    return pairs[key] if key in pairs else math.nan


def test_attribute_table_holds_each_judged_images_attributes() -> None:
    audited = _audited()
    table = attribute_table(audited)
    judged = audited[audited["correct"].notna()]
    assert table.index.equals(judged.index)
    assert list(table.columns) == ["image_id", "correct", "confidence", "attr:bg", "attr:site"]  # first seen first
    for row, cell in judged["attributes"].items():
        for key in ("bg", "site"):
            want, got = _expected(cell, key), table.at[row, f"attr:{key}"]
            assert got == want or (isinstance(want, float) and isinstance(got, float) and math.isnan(got)), (row, key)
    assert table.at[12, "attr:site"] == "Z"  # a key repeated in a cell keeps its last value
    assert table["correct"].dtype == bool


def test_attribute_table_reads_arrow_map_cells_alike() -> None:
    audited = _audited()
    arrow = pa.table({"image_id": audited["image_id"].tolist(), "correct": audited["correct"].tolist(),
                      "confidence": audited["confidence"].tolist(),
                      "attributes": pa.array([list(c.items()) if isinstance(c, dict) else c for c in audited["attributes"]],
                                             pa.map_(pa.string(), pa.string()))})
    from_parquet = attribute_table(to_frame(arrow, True))
    pd.testing.assert_frame_equal(from_parquet.reset_index(drop=True), attribute_table(audited).reset_index(drop=True))


def test_attribute_table_without_an_attributes_column_has_no_attribute_columns() -> None:
    table = attribute_table(_audited().drop(columns="attributes"))
    assert list(table.columns) == ["image_id", "correct", "confidence"]


def test_slice_table_derives_terciles_over_all_signal_rows() -> None:
    audited = _audited()
    signals = pd.DataFrame({"image_id": ["i7", "i0", "i3", "i5", "i4", "x1"],  # i6 has no row, x1 is not audited
                            "brightness": [0.6, 0.1, 0.3, 0.5, 0.2, 0.9], "contrast": [6, 5, 4, 3, 2, 1]})
    table = slice_table(audited, signals).set_index("image_id")
    assert table.loc["i0", "derived:brightness"] == "low" and table.loc["i7", "derived:brightness"] == "high"
    assert table.loc["i3", "derived:brightness"] == "mid"
    assert table.loc["i4", "derived:contrast"] == "low" and table.loc["i0", "derived:contrast"] == "high"
    assert pd.isna(table.loc["i6", "derived:brightness"])
    assert len(table) == audited["correct"].notna().sum()
