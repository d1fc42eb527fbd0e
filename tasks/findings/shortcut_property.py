"""``shortcut_property``: can one simple image property tell a class from the rest?

The properties: mean colour, brightness, contrast, border colour (``signals``), size and
aspect (the original image). For each property and class, a one-feature classifier (the
property cut into quantile bins of ~15 training images; a bin predicts the class when the
class is more frequent in it than overall) is cross-validated, and scored by balanced
accuracy, (TPR + TNR) / 2, whose chance level 0.5 is what the majority-class guess scores.
It is run against the labels (the data has the shortcut) and against the predictions (the
model follows it); flagged from ``shortcut_balanced_accuracy``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from visaudit.tasks.data.columns import class_matrix
from visaudit.tasks.data.schema import PROPERTY_COLUMNS
from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.inputs import signal_rows
from visaudit.tasks.findings.thresholds import Thresholds, severity

FOLDS = 5
IMAGES_PER_BIN = 15  # quantile bins of about this many training images, between 5 and 32 bins
PROPERTY_WORDS = {
    "mean_r": "mean red", "mean_g": "mean green", "mean_b": "mean blue", "brightness": "brightness",
    "contrast": "contrast", "border_r": "border red", "border_g": "border green", "border_b": "border blue",
    "aspect": "aspect ratio (width / height)", "megapixels": "size in megapixels",
}


def property_frame(audited: pd.DataFrame, signals: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per audited image with a signals row and a size, in the signals' order: its
    image_id, labels, predicted and every property; and the names of the properties that vary.

    Rows are matched by :func:`signal_rows` (Arrow's id lookup), not a merge on the ids."""
    position = signal_rows(audited, signals)
    width, height = (audited[c].astype(float).to_numpy() for c in ("image_width", "image_height"))
    keep = np.flatnonzero((position >= 0) & ~np.isnan(width) & ~np.isnan(height))
    rows = keep[np.argsort(position[keep], kind="stable")]
    at = position[rows]
    frame = pd.DataFrame({
        **{c: audited[c].take(rows).reset_index(drop=True) for c in ("image_id", "labels", "predicted")},
        **{c: signals[c].to_numpy()[at] for c in PROPERTY_COLUMNS},
        "aspect": width[rows] / height[rows], "megapixels": width[rows] * height[rows] / 1e6,
    })
    varying = [c for c in (*PROPERTY_COLUMNS, "aspect", "megapixels") if frame[c].astype(float).std() > 1e-6]
    return frame, varying


def stratified_folds(members: np.ndarray, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Each row's fold, 0 to ``folds - 1``: rows in random order within their first member
    class (``members``: (N, K) bool; rows of no class last), dealt round-robin."""
    n = len(members)
    first = np.where(members.any(axis=1), members.argmax(axis=1), -1)
    order = np.lexsort((np.random.default_rng(seed).random(n), first))
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % folds
    return fold


def one_feature_balanced_accuracy(
    x: np.ndarray, members: np.ndarray, folds: int = FOLDS, bins: int | None = None, seed: int = 0,
    fold: np.ndarray | None = None,
) -> np.ndarray:
    """Cross-validated balanced accuracy of a one-feature binned classifier, per class.

    ``x``: (N,) property values; ``members``: (N, K) bool, class membership (one-vs-rest,
    so multi-label works too). Folds are stratified on the first member class
    (:func:`stratified_folds`; ``fold`` gives them computed once for several properties).
    Returns (K,): ``(TPR + TNR) / 2`` over every row's held-out prediction, counted per bin
    so that no (N, K) array is made beside ``members``.
    """
    n, k = members.shape
    if fold is None:
        fold = stratified_folds(members, folds, seed)
    member_rows, member_classes = np.nonzero(members)  # one entry per (image, class it belongs to)
    positives = np.bincount(member_classes, minlength=k)
    negatives = n - positives
    hits = np.zeros(k, dtype=np.int64)  # test images of the class that their bin assigns to it
    called = np.zeros(k, dtype=np.int64)  # test images their bin assigns to the class
    bins = bins or int(np.clip(n * (folds - 1) / folds // IMAGES_PER_BIN, 5, 32))
    for f in range(folds):
        train = fold != f
        edges = np.unique(np.quantile(x[train], np.linspace(0, 1, bins + 1)[1:-1]))
        row_bin, width = np.searchsorted(edges, x, side="right"), len(edges) + 1
        in_train = train[member_rows]
        per_bin = np.bincount(row_bin[member_rows[in_train]] * k + member_classes[in_train],
                              minlength=width * k).reshape(width, k)
        totals = np.bincount(row_bin[train], minlength=width)[:, None]
        prior = np.bincount(member_classes[in_train], minlength=k) / train.sum()
        calls = (per_bin + prior) / (totals + 1.0) > prior  # (bins, K); one pseudo-image at the prior: empty bins call nothing
        called += np.bincount(row_bin[~train], minlength=width) @ calls
        tested_rows, tested_classes = member_rows[~in_train], member_classes[~in_train]
        hits += np.bincount(tested_classes[calls[row_bin[tested_rows], tested_classes]], minlength=k)
    tpr = hits / np.maximum(positives, 1)
    tnr = (negatives - (called - hits)) / np.maximum(negatives, 1)
    return 0.5 * (tpr + tnr)


def shortcut_property(
    audited: pd.DataFrame, signals: pd.DataFrame, classes: list[str], t: Thresholds
) -> list[Finding]:
    """Per class, the simple image property that best tells it from the rest, when that is too well;
    evidence the images wrongly predicted as the class first, then its images by the property."""
    if signals.empty:
        return []
    frame, names = property_frame(audited, signals)
    if len(frame) < 2 * FOLDS or not names:
        return []
    truth = class_matrix(frame["labels"], classes)
    prediction = class_matrix(frame["predicted"], classes)
    truth_folds, prediction_folds = stratified_folds(truth), stratified_folds(prediction)
    by_label = np.stack([one_feature_balanced_accuracy(frame[p].to_numpy(float), truth, fold=truth_folds)
                         for p in names])
    by_prediction = np.stack([one_feature_balanced_accuracy(frame[p].to_numpy(float), prediction, fold=prediction_folds)
                              for p in names])
    found = []
    enough = np.minimum(truth.sum(axis=0), (~truth).sum(axis=0)) >= max(t.min_class_images, 2 * FOLDS)
    flagged: list[int] = []
    for k, name in enumerate(classes):
        best = np.maximum(by_label[:, k], by_prediction[:, k])
        j = int(best.argmax())
        if not enough[k] or best[j] < t.shortcut_balanced_accuracy:
            continue
        twin = next((f for f in flagged if np.array_equal(truth[:, f], ~truth[:, k])), None)
        if twin is not None:  # two classes that split the data: one cause, already reported
            continue
        flagged.append(k)
        found.append(_finding(frame, names, j, k, classes, truth, prediction, by_label, by_prediction, best, t))
    return found


def _finding(
    frame: pd.DataFrame, names: list[str], j: int, k: int, classes: list[str], truth: np.ndarray,
    prediction: np.ndarray, by_label: np.ndarray, by_prediction: np.ndarray, best: np.ndarray, t: Thresholds,
) -> Finding:
    """The finding for class k and property j. Whether the data has the shortcut (the labels
    follow the property) or only the model does (its predictions follow it, the labels do
    not) decides the message and the medians quoted (of the class's images, or of the images
    predicted as the class, against the rest)."""
    name, prop = classes[k], names[j]
    in_data = by_label[j, k] >= t.shortcut_balanced_accuracy
    members = truth[:, k] if in_data else prediction[:, k]
    others = [PROPERTY_WORDS[names[i]] for i in np.argsort(-best) if i != j and best[i] >= t.shortcut_balanced_accuracy]
    values = frame[prop].to_numpy(float)
    inside, outside = float(np.median(values[members])), float(np.median(values[~members]))
    direction = np.sign(inside - outside) or 1.0
    evidence = frame.assign(_fooled=prediction[:, k] & ~truth[:, k], _mine=truth[:, k], _score=direction * values)
    evidence = evidence[evidence["_fooled"] | evidence["_mine"]].sort_values(
        ["_fooled", "_score"], ascending=False, kind="stable"
    )
    pair = (f" (with two classes, this splits '{classes[1 - k]}' from '{name}' too)"
            if len(classes) == 2 and (truth.sum(axis=1) == 1).all() else "")
    who = f"'{name}'" if in_data else f"the images the model calls '{name}'"
    if in_data:
        verdict = ("A property this simple should not identify a class: the data has a shortcut the model can use "
                   "instead of the object"
                   + (", and the model follows it more than the labels do, so it has learnt it"
                      if by_prediction[j, k] > by_label[j, k] else "")
                   + f". Balance the {PROPERTY_WORDS[prop]} across classes in training (collect or augment)")
    else:
        verdict = (f"The labels of these images do not follow it (below the {t.shortcut_balanced_accuracy:.2f} flag), "
                   "the model's predictions do: the model has learnt the property as a cue for the class from its "
                   "training data, and applies it here where it does not hold. Balance the "
                   f"{PROPERTY_WORDS[prop]} across classes in training")
    return Finding(
        kind="shortcut_property",
        severity=severity(float(best[j]), 0.9, 0.8),
        class_name=name,
        slice=f"property={prop}",
        metric="balanced_accuracy",
        value=float(best[j]),
        threshold=t.shortcut_balanced_accuracy,
        message=(
            f"The {PROPERTY_WORDS[prop]} of an image alone tells '{name}' from the other classes{pair} with "
            f"cross-validated balanced accuracy {by_label[j, k]:.2f} for the labels and "
            f"{by_prediction[j, k]:.2f} for the model's predictions (chance 0.50): median "
            f"{inside:.3g} for {who} against {outside:.3g} for the rest"
            + (f"; also {', '.join(others)}" if others else "")
            + f". {verdict}, and check the images the model assigns to this class on that property alone "
            "(evidence: wrongly predicted first)."
        ),
        evidence=tuple(evidence["image_id"].head(t.evidence)),
    )


DETECTOR = Detector(
    kind="shortcut_property",
    detect=lambda tables, t: shortcut_property(tables.audited, tables.signals, tables.classes, t),
    needs=("signals",),
    support="association",
)
