"""``summary_metrics``: the headline numbers, alike from object cells and Arrow lists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from visaudit.tasks.findings.metrics import summary_metrics


def _predictions() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    classes = ["cat", "dog", "fox", "owl", "bee", "ant", "elk"]
    n = 400
    labels = [[classes[i]] for i in rng.integers(0, 7, n)]
    top = [list(rng.permutation(classes)[:5]) for _ in range(n)]
    correct = pd.array([t[0] == ls[0] for t, ls in zip(top, labels)], dtype="boolean")
    error = [None] * n
    for i in range(0, n, 37):  # unreadable: no prediction at all
        error[i], top[i], correct[i] = "cannot decode", None, pd.NA
    for i in range(5, n, 41):  # readable but not judged (a label outside the classes)
        correct[i] = pd.NA
    return pd.DataFrame({"error": error, "correct": correct, "labels": labels, "top_classes": top,
                         "confidence": rng.uniform(0.2, 1.0, n).astype(np.float32)})


def _as_arrow(frame: pd.DataFrame) -> pd.DataFrame:
    strings = pd.ArrowDtype(pa.list_(pa.string()))
    return frame.assign(**{name: pd.Series(pa.array(frame[name].tolist(), pa.list_(pa.string())), dtype=strings)
                           for name in ("labels", "top_classes")})


@pytest.mark.parametrize("arrow", [False, True], ids=["object-cells", "arrow-lists"])
def test_headline_numbers_by_hand(arrow: bool) -> None:
    frame = _predictions()
    judged = frame[frame["error"].isna() & frame["correct"].notna()]
    first = judged["labels"].map(lambda cell: cell[0])
    in_top = [f in top for f, top in zip(first, judged["top_classes"])]
    per_class = judged["correct"].astype(bool).groupby(first.to_numpy()).mean()
    got = summary_metrics(_as_arrow(frame) if arrow else frame, multi_label=False)
    assert (got.images, got.audited, got.unreadable) == (400, 400 - 11, 11)
    assert got.accuracy == pytest.approx(judged["correct"].astype(bool).mean())
    assert got.top5_accuracy == pytest.approx(np.mean(in_top)) and 0.5 < got.top5_accuracy < 1
    assert (got.class_accuracy_min, got.class_accuracy_max) == pytest.approx((per_class.min(), per_class.max()))
    assert got == summary_metrics(frame, multi_label=False)
