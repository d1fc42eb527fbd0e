"""The run's headline numbers, computed once from the ``predictions`` table.

run.json, the metrics table's trend rows and the report's cover all show these figures;
they come from this one function so that they can never disagree.

- accuracy: share of judged images (readable, with labels among the classes) whose
  prediction is right (multi-label: exact match of the predicted and true label sets);
- top-5 accuracy (multi-class): share whose first label is among the five top classes;
- ECE: expected calibration error of the top-1 confidence (see ``calibration``);
- per-class accuracy (multi-class): accuracy over each true class's images; the report
  shows its lowest and highest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from visaudit.tasks.data.columns import arrow_lists, flat_items, rows_where
from visaudit.tasks.findings.calibration import reliability_of


@dataclass(frozen=True)
class RunMetrics:
    """Headline numbers of one run (None where they do not apply or nothing was judged)."""

    images: int
    audited: int
    unreadable: int
    accuracy: float | None
    top5_accuracy: float | None
    ece: float | None
    class_accuracy_min: float | None = None
    class_accuracy_max: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_labels(labels: pd.Series) -> pa.Array:
    """Each row's first label as text (``"None"`` for a null one, as ``str`` writes it), from
    Arrow lists or object cells alike; judged rows all have a label."""
    return pc.fill_null(pc.list_element(arrow_lists(labels), 0), "None")


def judged_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """Readable rows whose labels could be judged (``correct`` not null)."""
    audited = rows_where(predictions, predictions["error"].isna())
    return rows_where(audited, audited["correct"].notna())


def summary_metrics(predictions: pd.DataFrame, multi_label: bool) -> RunMetrics:
    """The headline numbers of a ``predictions`` frame (one run's rows; its ``labels`` and
    ``top_classes`` as Arrow lists or object cells: both are read whole through Arrow, no
    Python loop per row)."""
    audited = rows_where(predictions, predictions["error"].isna())
    judged = judged_rows(predictions)
    accuracy = top5 = ece = low = high = None
    if len(judged):
        correct = judged["correct"].astype(bool)
        accuracy = float(correct.mean())
        if not multi_label:
            firsts = first_labels(judged["labels"])
            rows, listed_names = flat_items(judged["top_classes"])
            among = np.zeros(len(judged), dtype=bool)
            among[rows[pc.equal(listed_names, firsts.take(pa.array(rows))).to_numpy(zero_copy_only=False)]] = True
            top5 = float(among.mean())
            ece = reliability_of(judged).ece
            per_class = correct.groupby(firsts.to_numpy(zero_copy_only=False)).mean()
            low, high = float(per_class.min()), float(per_class.max())
    return RunMetrics(
        images=int(len(predictions)),
        audited=int(len(audited)),
        unreadable=int(predictions["error"].notna().sum()),
        accuracy=accuracy,
        top5_accuracy=top5,
        ece=ece,
        class_accuracy_min=low,
        class_accuracy_max=high,
    )
