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

from visaudit.tasks.findings.calibration import reliability_of
from visaudit.tasks.findings.inputs import listed


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


def _among(names: np.ndarray, cells: pd.Series) -> np.ndarray:
    """(N,) bool: whether each row's name is one of its list cell's names (as strings; a null cell has none)."""
    rows, listed_names = listed(cells)
    as_text = np.array([str(name) for name in listed_names], dtype=object)
    out = np.zeros(len(names), dtype=bool)
    out[rows[as_text == names[rows]]] = True
    return out


def judged_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """Readable rows whose labels could be judged (``correct`` not null)."""
    audited = predictions[predictions["error"].isna()]
    return audited[audited["correct"].notna()]


def summary_metrics(predictions: pd.DataFrame, multi_label: bool) -> RunMetrics:
    """The headline numbers of a ``predictions`` frame (one run's rows)."""
    audited = predictions[predictions["error"].isna()]
    judged = judged_rows(predictions)
    accuracy = top5 = ece = low = high = None
    if len(judged):
        correct = judged["correct"].astype(bool)
        accuracy = float(correct.mean())
        if not multi_label:
            firsts = judged["labels"].map(lambda cell: str(cell[0]))  # judged: every row has a label
            top5 = float(np.mean(_among(firsts.to_numpy(object), judged["top_classes"])))
            ece = reliability_of(judged).ece
            per_class = correct.groupby(firsts.to_numpy()).mean()
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
