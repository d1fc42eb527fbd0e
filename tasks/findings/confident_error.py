"""``confident_error``: per true class, the share of its images the model gets wrong with
high confidence (at least ``confident_error_confidence``); flagged from
``confident_error_share``. Multi-class runs only."""

from __future__ import annotations

import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.inputs import true_class
from visaudit.tasks.findings.thresholds import Thresholds, severity


def confident_errors(audited: pd.DataFrame, t: Thresholds) -> list[Finding]:
    """One finding per true class with too many confident mistakes; evidence most confident first."""
    frame = audited.assign(true=true_class(audited)).dropna(subset=["true"])
    frame = frame[frame["correct"].notna()]
    found = []
    for name, group in frame.groupby("true", sort=True):
        if len(group) < t.min_class_images:
            continue
        bad = group[(group["correct"] == False) & (group["confidence"] >= t.confident_error_confidence)]  # noqa: E712
        share = len(bad) / len(group)
        if len(bad) == 0 or share < t.confident_error_share:
            continue
        bad = bad.sort_values("confidence", ascending=False)
        top_wrong = bad["predicted"].map(lambda p: p[0]).value_counts()
        found.append(Finding(
            kind="confident_error",
            severity=severity(share, 0.10, 0.05),
            class_name=str(name),
            metric="confident_error_share",
            value=float(share),
            threshold=t.confident_error_share,
            message=(
                f"{len(bad)} of {len(group)} '{name}' images ({share:.1%}) are misclassified with "
                f"confidence >= {t.confident_error_confidence:.0%}, mostly as '{top_wrong.index[0]}'. "
                "Confident mistakes are not caught by a confidence threshold; check these images for "
                "label errors or a shortcut the model learnt, and consider calibration."
            ),
            evidence=tuple(bad["image_id"].head(t.evidence)),
        ))
    return found


DETECTOR = Detector(
    kind="confident_error",
    detect=lambda tables, t: confident_errors(tables.audited, t),
    multi_label=False,
)
