"""Typed rows of the long-format ``metrics`` table, shared by every layer that measures.

One :class:`MetricRow` per measured number (a sanity-check correlation, a deletion AUC, a
fixed-location probe, a run's headline figure); :func:`metric_frame` turns a list of them
into a DataFrame in the table's schema, so no caller hand-builds the columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import pandas as pd

from visaudit.tasks.data.schema import table_schema


@dataclass(frozen=True)
class MetricRow:
    """One measured number: ``metric`` names it, ``method``/``layer``/``class_name``/``detail``
    say what it was measured on, ``images`` how many images it rests on."""

    metric: str
    value: float | None
    images: int
    method: str | None = None
    layer: str | None = None
    class_name: str | None = None
    detail: str | None = None


def metric_frame(rows: Iterable[MetricRow]) -> pd.DataFrame:
    """Rows in the ``metrics`` table's column order and types (None values become NaN)."""
    records = [asdict(row) | {"value": math.nan if row.value is None else float(row.value)} for row in rows]
    columns = table_schema("metrics").names
    frame = pd.DataFrame(records, columns=columns)
    return frame.astype({"value": "float64", "images": "int32"})
