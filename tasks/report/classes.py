"""The per-class results section: the class table, the confusion matrix, the reliability
diagram and the slices (accuracy per value of each manifest attribute)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from visaudit.tasks.data.columns import attribute_pairs_of, class_matrix, first_codes
from visaudit.tasks.findings.calibration import reliability_of
from visaudit.tasks.findings.metrics import judged_rows
from visaudit.tasks.findings.stats import Z_95, wilson_interval
from visaudit.tasks.report.figures import Painter, draw_confusion, draw_reliability
from visaudit.tasks.report.formatting import percent, score

MAX_MATRIX_CLASSES = 25  # a bigger confusion matrix shows the classes with the most errors
MAX_SLICE_VALUES = 20  # attributes with more distinct values are identifiers, not slices


@dataclass(frozen=True)
class ClassRow:
    """One class's line of the per-class table (None where nothing was there to measure)."""

    name: str
    images: int
    recall: float | None
    precision: float | None
    confidence: float | None
    errors: int


@dataclass(frozen=True)
class Confusion:
    """The confusion matrix's figure and what it leaves out."""

    src: str
    note: str


@dataclass(frozen=True)
class Calibration:
    """The reliability diagram's figure, its ECE, bin count and the overall direction of the gap."""

    src: str
    ece: str
    bins: int
    direction: str


@dataclass(frozen=True)
class SliceRow:
    """One attribute value: images, accuracy with its 95% Wilson interval, mean confidence."""

    attribute: str
    value: str
    images: int
    accuracy: str
    interval: str
    confidence: str


def judged_of(predictions: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """``findings.metrics.judged_rows`` with ``columns`` only (and ``correct``): a section copies
    what it reads of the judged rows, not every column."""
    return judged_rows(predictions[["error", "correct", *columns]])


def class_table(predictions: pd.DataFrame, classes: list[str], multilabel: bool) -> list[ClassRow]:
    """Per class: images, recall, precision, mean top-1 confidence, errors.

    Multi-class errors are the class's images predicted as another class; multi-label
    errors are the class's misses plus its false alarms.
    """
    judged = judged_of(predictions, "labels", "predicted", "confidence")
    labels = class_matrix(judged["labels"], classes)
    predicted = class_matrix(judged["predicted"], classes)
    confidence = judged["confidence"].to_numpy(dtype=np.float64)
    hits = (labels & predicted).sum(axis=0)
    images, called = labels.sum(axis=0), predicted.sum(axis=0)
    errors = images - hits + (called - hits if multilabel else 0)
    rows = []
    for k, name in enumerate(classes):
        mine = confidence[labels[:, k]]
        rows.append(ClassRow(
            name=name,
            images=int(images[k]),
            recall=hits[k] / images[k] if images[k] else None,
            precision=hits[k] / called[k] if called[k] else None,
            confidence=float(np.nanmean(mine)) if len(mine) and not np.isnan(mine).all() else None,
            errors=int(errors[k]),
        ))
    return rows


def confusion_view(predictions: pd.DataFrame, classes: list[str], painter: Painter) -> Confusion | None:
    """Multi-class confusion matrix (counts in cells, colour normalised per true class)."""
    judged = judged_of(predictions, "labels", "predicted")
    if judged.empty or not classes:
        return None
    counts = pair_counts(first_codes(judged["labels"], classes), first_codes(judged["predicted"], classes), classes)
    note = ""
    if len(classes) > MAX_MATRIX_CLASSES:
        off = counts.to_numpy() * (1 - np.eye(len(classes), dtype=np.int64))
        keep = np.sort(np.argsort(-(off.sum(axis=0) + off.sum(axis=1)), kind="stable")[:MAX_MATRIX_CLASSES])
        counts = counts.iloc[keep, keep]
        note = f"Showing the {MAX_MATRIX_CLASSES} of {len(classes)} classes involved in the most errors."
    return Confusion(painter.save("confusion-matrix.png", lambda tmp: draw_confusion(counts, tmp)), note)


def pair_counts(true: np.ndarray, predicted: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """How many rows pair each true class (rows) with each predicted class (columns); ``true`` and
    ``predicted``: each row's :func:`~visaudit.tasks.data.columns.class_codes` code (-1: none)."""
    k = len(classes)
    both = (true >= 0) & (predicted >= 0)
    counts = np.bincount(true[both] * k + predicted[both], minlength=k * k).reshape(k, k).astype(np.int64)
    code = {name: i for i, name in enumerate(classes)}  # a repeated name: one code, every line shows it
    lines = [code[name] for name in classes]
    return pd.DataFrame(counts[np.ix_(lines, lines)], index=pd.Index(classes), columns=pd.Index(classes))


def calibration_view(predictions: pd.DataFrame, painter: Painter) -> Calibration | None:
    """Reliability diagram (accuracy against confidence per bin) and the ECE, multi-class runs."""
    judged = judged_of(predictions, "confidence")
    if judged.empty:
        return None
    result = reliability_of(judged)
    src = painter.save("reliability.png", lambda tmp: draw_reliability(result, tmp))
    filled = result.counts > 0
    over = float((result.counts * np.where(filled, result.confidence - result.accuracy, 0)).sum() / result.counts.sum())
    return Calibration(src=src, ece=percent(result.ece), bins=len(result.counts),
                       direction="over-confident" if over > 0 else "under-confident")


def slice_rows(predictions: pd.DataFrame) -> list[SliceRow]:
    """Per manifest attribute with 2 to MAX_SLICE_VALUES values, one row per value."""
    judged = judged_of(predictions, "attributes", "confidence")
    if judged.empty:
        return []
    pairs = attribute_pairs_of(judged["attributes"])
    valued = pairs.value >= 0
    row, key, value = pairs.row[valued], pairs.key[valued], pairs.value[valued]
    correct = judged["correct"].astype(bool).to_numpy()
    confidence = judged["confidence"].reset_index(drop=True)
    rows = []
    for code in sorted(np.unique(key), key=lambda c: pairs.keys[c]):
        mine = key == code
        present = np.unique(value[mine])
        if not 2 <= len(present) <= MAX_SLICE_VALUES:
            continue
        for v in sorted(present, key=lambda c: pairs.values[c]):
            at = row[mine & (value == v)]  # the images holding this value, in table order
            n = len(at)
            k = int(correct[at].sum())
            low, high = wilson_interval(np.float64(k), np.float64(n), Z_95)
            rows.append(SliceRow(
                attribute=pairs.keys[code], value=pairs.values[v], images=n, accuracy=percent(k / n),
                interval=f"{low:.0%}-{high:.0%}", confidence=score(confidence.iloc[at].mean()),
            ))
    return rows
