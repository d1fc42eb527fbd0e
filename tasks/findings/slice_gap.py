"""``slice_gap``: slices of the data on which the model is surely weaker.

Per attribute value (manifest columns and derived brightness/contrast terciles) the
accuracy of the slice against the rest, with Newcombe's hybrid score interval for the
difference of two proportions (``stats.difference_interval``) at a Bonferroni-corrected
level (``slice_confidence`` over the slices tested); flagged only when the whole interval
lies above ``slice_margin``.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd

from visaudit.tasks.data.columns import attribute_pairs_of
from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.inputs import shared, signal_rows
from visaudit.tasks.findings.stats import difference_interval
from visaudit.tasks.findings.thresholds import Thresholds, severity

TERCILES = np.array(["low", "mid", "high"], dtype=object)


@shared
def attribute_table(audited: pd.DataFrame) -> pd.DataFrame:
    """The judged images' image_id, correct, confidence and one column per manifest attribute
    ("attr:...", object cells; NaN where an image lacks the key, None where its value is null).
    Built from the column's (image, key, value) codes (``data.columns.attribute_pairs_of``): no
    dict per image, and each distinct value is one string object however many images hold it."""
    judged = audited[audited["correct"].notna()]
    frame = judged[["image_id", "correct", "confidence"]].copy()
    frame["correct"] = frame["correct"].astype(bool)
    if "attributes" not in judged or judged.empty:
        return frame
    pairs = attribute_pairs_of(judged["attributes"])
    values = np.array([*pairs.values, None], dtype=object)  # code -1 (a null value) takes the last
    columns = {}
    for code, key in enumerate(pairs.keys):
        mine = pairs.key == code
        cells = np.full(len(judged), np.nan, dtype=object)
        cells[pairs.row[mine]] = values[pairs.value[mine]]
        columns[f"attr:{key}"] = pd.Series(cells, index=judged.index, dtype=object)
    return pd.concat([frame, pd.DataFrame(columns, index=judged.index)], axis=1)


@shared
def slice_table(audited: pd.DataFrame, signals: pd.DataFrame) -> pd.DataFrame:
    """image_id, correct, confidence and one column per slice attribute (manifest + derived terciles
    of brightness and contrast over all ``signals`` rows; NaN for an image without a row)."""
    frame = attribute_table(audited)
    if len(signals) < 3:  # terciles need three images (qcut of fewer has repeated bin edges)
        return frame
    rows = signal_rows(frame, signals)
    found = rows >= 0
    derived = {}
    for name in ("brightness", "contrast"):  # tercile codes, then one shared string object per label
        codes = pd.qcut(signals[name].rank(method="first"), 3, labels=False).to_numpy()[rows[found]]
        cells = np.full(len(frame), np.nan, dtype=object)
        cells[np.flatnonzero(found)[~np.isnan(codes)]] = TERCILES[codes[~np.isnan(codes)].astype(np.intp)]
        derived[f"derived:{name}"] = pd.array(cells, dtype="str")
    return frame.assign(**derived).reset_index(drop=True)


@shared
def slice_gap(audited: pd.DataFrame, signals: pd.DataFrame, t: Thresholds) -> list[Finding]:
    """Slices (attribute = value) whose accuracy is below the rest's by more than the margin, surely;
    evidence the slice's errors, most confident first. ``signals`` may be empty (no derived slices)."""
    if "correct" not in audited:
        return []
    frame = slice_table(audited, signals)
    if len(frame) < 2 * t.min_slice_images:
        return []
    candidates = []
    for column in [c for c in frame.columns if c.startswith(("attr:", "derived:"))]:
        values = frame[column].dropna()
        counts = values.value_counts()
        if len(counts) < 2 or len(counts) > t.max_slice_values:
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
    found = []
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
        found.append(
            Finding(
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
                evidence=tuple(errors["image_id"].head(t.evidence)),
            )
        )
    return found


DETECTOR = Detector(
    kind="slice_gap",
    detect=lambda tables, t: slice_gap(tables.audited, tables.signals, t),
    support="comparison",
)
