"""Dataset-bias detectors over tables: ``shortcut_property`` and ``slice_gap``.

``shortcut_property``: can one simple image property (mean colour, brightness, contrast,
border colour, size, aspect) tell a class from the rest? For each property and class, a
one-feature classifier (the property cut into quantile bins of ~15 training images; a bin predicts the class when
the class is more frequent in it than overall) is cross-validated, and scored by balanced
accuracy, (TPR + TNR) / 2, whose chance level 0.5 is what the majority-class guess scores.
It is run against the labels (the data has the shortcut) and against the predictions
(the model follows it).

``slice_gap``: per attribute value (manifest columns and derived brightness/contrast
terciles) the accuracy of the slice against the rest, with Newcombe's hybrid score
interval for the difference of two proportions (Newcombe 1998, method 10) at a
Bonferroni-corrected level; flagged only when the whole interval lies above the margin.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd

from visaudit.tasks.data.schema import PROPERTY_COLUMNS
from visaudit.tasks.data.sources import attribute_pairs
from visaudit.tasks.findings.thresholds import Thresholds, severity

FOLDS = 5
IMAGES_PER_BIN = 15  # quantile bins of about this many training images, between 5 and 32 bins
PROPERTY_WORDS = {
    "mean_r": "mean red", "mean_g": "mean green", "mean_b": "mean blue", "brightness": "brightness",
    "contrast": "contrast", "border_r": "border red", "border_g": "border green", "border_b": "border blue",
    "aspect": "aspect ratio (width / height)", "megapixels": "size in megapixels",
}


def property_frame(audited: pd.DataFrame, signals: pd.DataFrame) -> pd.DataFrame:
    """One row per audited image with a signal: image_id plus every property that varies."""
    sizes = audited[["image_id", "image_width", "image_height"]].dropna()
    width, height = sizes["image_width"].astype(float), sizes["image_height"].astype(float)
    sizes = pd.DataFrame({"image_id": sizes["image_id"], "aspect": width / height, "megapixels": width * height / 1e6})
    frame = signals[["image_id", *PROPERTY_COLUMNS]].merge(sizes, on="image_id", how="inner")
    frame = frame[frame["image_id"].isin(audited["image_id"])]
    varying = [c for c in frame.columns[1:] if frame[c].astype(float).std() > 1e-6]
    return frame[["image_id", *varying]].reset_index(drop=True)


def one_feature_balanced_accuracy(
    x: np.ndarray, members: np.ndarray, folds: int = FOLDS, bins: int | None = None, seed: int = 0
) -> np.ndarray:
    """Cross-validated balanced accuracy of a one-feature binned classifier, per class.

    ``x``: (N,) property values; ``members``: (N, K) bool, class membership (one-vs-rest,
    so multi-label works too). Folds are stratified on the first member class. Returns (K,).
    """
    n, k = members.shape
    rng = np.random.default_rng(seed)
    first = np.where(members.any(axis=1), members.argmax(axis=1), -1)
    order = np.lexsort((rng.random(n), first))
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % folds
    predicted = np.zeros((n, k), dtype=bool)
    y = members.astype(np.float64)
    bins = bins or int(np.clip(n * (folds - 1) / folds // IMAGES_PER_BIN, 5, 32))
    for f in range(folds):
        train, test = fold != f, fold == f
        edges = np.unique(np.quantile(x[train], np.linspace(0, 1, bins + 1)[1:-1]))
        train_bin = np.searchsorted(edges, x[train], side="right")
        test_bin = np.searchsorted(edges, x[test], side="right")
        per_bin = np.zeros((len(edges) + 1, k))
        np.add.at(per_bin, train_bin, y[train])
        totals = np.bincount(train_bin, minlength=len(edges) + 1)[:, None]
        prior = y[train].mean(axis=0)
        rate = (per_bin + prior) / (totals + 1.0)  # one pseudo-image at the prior: empty bins predict nothing
        predicted[test] = rate[test_bin] > prior
    positives, negatives = members.sum(axis=0), (~members).sum(axis=0)
    tpr = (predicted & members).sum(axis=0) / np.maximum(positives, 1)
    tnr = (~predicted & ~members).sum(axis=0) / np.maximum(negatives, 1)
    return 0.5 * (tpr + tnr)


def _membership(cells: pd.Series, classes: list[str]) -> np.ndarray:
    position = {name: i for i, name in enumerate(classes)}
    out = np.zeros((len(cells), len(classes)), dtype=bool)
    for row, names in enumerate(cells):
        for name in names if names is not None else ():
            if name in position:
                out[row, position[name]] = True
    return out


def shortcut_property(
    audited: pd.DataFrame, signals: pd.DataFrame, classes: list[str], t: Thresholds
) -> list[dict]:
    """Per class, the simple image property that best tells it from the rest, when that is too well."""
    if signals.empty:
        return []
    props = property_frame(audited, signals)
    frame = props.merge(audited[["image_id", "labels", "predicted"]], on="image_id")
    if len(frame) < 2 * FOLDS or len(props.columns) < 2:
        return []
    truth = _membership(frame["labels"], classes)
    prediction = _membership(frame["predicted"], classes)
    names = list(props.columns[1:])
    by_label = np.stack([one_feature_balanced_accuracy(frame[p].to_numpy(float), truth) for p in names])
    by_prediction = np.stack([one_feature_balanced_accuracy(frame[p].to_numpy(float), prediction) for p in names])
    rows = []
    enough = np.minimum(truth.sum(axis=0), (~truth).sum(axis=0)) >= max(t.min_class_images, 2 * FOLDS)
    for k, name in enumerate(classes):
        best = np.maximum(by_label[:, k], by_prediction[:, k])
        j = int(best.argmax())
        if not enough[k] or best[j] < t.shortcut_balanced_accuracy:
            continue
        prop = names[j]
        others = [PROPERTY_WORDS[names[i]] for i in np.argsort(-best) if i != j and best[i] >= t.shortcut_balanced_accuracy]
        values = frame[prop].to_numpy(float)
        inside, outside = float(np.median(values[truth[:, k]])), float(np.median(values[~truth[:, k]]))
        direction = np.sign(inside - outside) or 1.0
        evidence = frame.assign(
            _fooled=prediction[:, k] & ~truth[:, k], _mine=truth[:, k], _score=direction * values
        )
        evidence = evidence[evidence["_fooled"] | evidence["_mine"]].sort_values(
            ["_fooled", "_score"], ascending=False, kind="stable"
        )
        follows = by_prediction[j, k] > by_label[j, k]
        rows.append(
            dict(
                kind="shortcut_property",
                severity=severity(float(best[j]), 0.9, 0.8),
                class_name=name,
                slice=f"property={prop}",
                metric="balanced_accuracy",
                value=float(best[j]),
                threshold=t.shortcut_balanced_accuracy,
                message=(
                    f"The {PROPERTY_WORDS[prop]} of an image alone tells '{name}' from the other classes with "
                    f"cross-validated balanced accuracy {by_label[j, k]:.2f} for the labels and "
                    f"{by_prediction[j, k]:.2f} for the model's predictions (chance 0.50): median "
                    f"{inside:.3g} for '{name}' against {outside:.3g} for the rest"
                    + (f"; also {', '.join(others)}" if others else "")
                    + ". "
                    + ("The model follows this property more than the labels do, so it has learnt it. "
                       if follows else "")
                    + "A property this simple should not identify a class: the data has a shortcut the model "
                    f"can use instead of the object. Balance the {PROPERTY_WORDS[prop]} across classes in "
                    "training (collect or augment), and check the images the model assigns to this class "
                    "on that property alone (evidence: wrongly predicted first)."
                ),
                evidence=evidence["image_id"].head(t.evidence).tolist(),
            )
        )
    return rows


def wilson_interval(successes: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion (vectorised)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def difference_interval(
    k1: np.ndarray, n1: np.ndarray, k2: np.ndarray, n2: np.ndarray, z: float
) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval for p2 - p1 (method 10 of Newcombe 1998)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p2 - p1
    return d - np.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + np.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def slice_table(audited: pd.DataFrame, signals: pd.DataFrame) -> pd.DataFrame:
    """image_id, correct, confidence and one column per slice attribute (manifest + derived terciles)."""
    judged = audited[audited["correct"].notna()]
    frame = judged[["image_id", "correct", "confidence"]].copy()
    frame["correct"] = frame["correct"].astype(bool)
    attributes = pd.DataFrame(
        [dict(attribute_pairs(cell)) for cell in judged["attributes"]], index=judged.index, dtype=object
    ) if "attributes" in judged else pd.DataFrame(index=judged.index)
    frame = pd.concat([frame, attributes.add_prefix("attr:")], axis=1)
    if not signals.empty:
        derived = signals[["image_id", "brightness", "contrast"]].copy()
        for name in ("brightness", "contrast"):
            derived[f"derived:{name}"] = pd.qcut(
                derived[name].rank(method="first"), 3, labels=["low", "mid", "high"]
            ).astype(str)
        frame = frame.merge(derived[["image_id", "derived:brightness", "derived:contrast"]], on="image_id", how="left")
    return frame


def slice_gap(audited: pd.DataFrame, signals: pd.DataFrame, t: Thresholds) -> list[dict]:
    """Slices (attribute = value) whose accuracy is below the rest's by more than the margin, surely."""
    frame = slice_table(audited, signals)
    if len(frame) < 2 * t.min_slice_images:
        return []
    candidates = []
    for column in [c for c in frame.columns if c.startswith(("attr:", "derived:"))]:
        values = frame[column].dropna()
        counts = values.value_counts()
        if len(counts) < 2 or len(counts) > 50:
            continue
        if len(counts) == 2 and len(values) == len(frame):  # both values give the same comparison:
            accuracy = frame.groupby(column)["correct"].mean()  # keep the weaker side
            counts = counts.loc[[accuracy.idxmin()]]
        for value, n_in in counts.items():
            if n_in >= t.min_slice_images and len(frame) - n_in >= t.min_slice_images:
                candidates.append((column, value))
    if not candidates:
        return []
    z = NormalDist().inv_cdf(1 - (1 - t.slice_confidence) / (2 * len(candidates)))
    rows = []
    for column, value in candidates:
        inside = (frame[column] == value).to_numpy()
        k1, n1 = frame["correct"][inside].sum(), inside.sum()
        k2, n2 = frame["correct"][~inside].sum(), (~inside).sum()
        low, high = difference_interval(np.float64(k1), np.float64(n1), np.float64(k2), np.float64(n2), z)
        gap = k2 / n2 - k1 / n1
        if low <= t.slice_margin:
            continue
        conf_in = frame["confidence"][inside].astype(float)
        conf_out = frame["confidence"][~inside].astype(float)
        conf_gap = conf_out.mean() - conf_in.mean()
        conf_half = z * np.sqrt(conf_in.var() / len(conf_in) + conf_out.var() / len(conf_out))
        kind, name = column.split(":", 1)
        label = f"{name}={value}"
        source = "the manifest's attribute" if kind == "attr" else "the derived tercile of image"
        errors = frame[inside & ~frame["correct"].to_numpy()].sort_values("confidence", ascending=False)
        rows.append(
            dict(
                kind="slice_gap",
                severity=severity(float(gap), 0.2, 0.1),
                class_name=None,
                slice=label,
                metric="accuracy_gap",
                value=float(gap),
                threshold=t.slice_margin,
                message=(
                    f"Images with {source} {label} are classified correctly {k1 / n1:.1%} of the time "
                    f"({int(k1)} of {int(n1)}) against {k2 / n2:.1%} for the rest: a gap of {gap:.1%} "
                    f"(interval {low:.1%} to {high:.1%} at {t.slice_confidence:.0%} over {len(candidates)} slices, "
                    f"above the {t.slice_margin:.0%} margin). Mean confidence is {conf_in.mean():.2f} against "
                    f"{conf_out.mean():.2f} (gap {conf_gap:+.2f} ± {conf_half:.2f}). The model is weaker on this "
                    "slice: add training images like these, or report the slice's accuracy separately."
                ),
                evidence=errors["image_id"].head(t.evidence).tolist(),
            )
        )
    return rows
