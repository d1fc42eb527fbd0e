"""``confident_error``: per true class, the share of its images the model gets wrong with
high confidence (at least ``confident_error_confidence``); flagged from
``confident_error_share``. Multi-class runs only.

One finding per cause: confident mistakes that lie in a failing group of their class
(``group_gap.failing_groups``) are that group's, not counted here; a class whose confident
mistakes are all so explained gets a low row that says so ("explained=group_gap")."""

from __future__ import annotations

import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.group_gap import describe_groups, failing_groups, in_failing_group
from visaudit.tasks.findings.inputs import true_class
from visaudit.tasks.findings.thresholds import Thresholds, severity


def confident_errors(audited: pd.DataFrame, signals: pd.DataFrame, t: Thresholds) -> list[Finding]:
    """One finding per true class with too many confident mistakes outside its failing groups;
    evidence most confident first."""
    frame = audited[["image_id", "predicted", "correct", "confidence"]].assign(true=true_class(audited)).dropna(subset=["true"])
    frame = frame[frame["correct"].notna()]
    groups = failing_groups(audited, signals, t)
    found = []
    for name, group in frame.groupby("true", sort=True):
        if len(group) < t.min_class_images:
            continue
        every = group[(group["correct"] == False) & (group["confidence"] >= t.confident_error_confidence)]  # noqa: E712
        if len(every) == 0 or len(every) / len(group) < t.confident_error_share:
            continue
        in_group, mine = in_failing_group(every["image_id"], groups, str(name))
        bad = every[~in_group].sort_values("confidence", ascending=False)
        share = len(bad) / len(group)
        if len(bad) == 0 or share < t.confident_error_share:
            total = len(every) / len(group)
            found.append(Finding(
                kind="confident_error", severity="low", class_name=str(name), slice="explained=group_gap",
                metric="confident_error_share", value=float(total), threshold=t.confident_error_share,
                message=(f"{len(every)} of {len(group)} '{name}' images ({total:.1%}) are misclassified with "
                         f"confidence >= {t.confident_error_confidence:.0%}, but {int(in_group.sum())} of them lie "
                         f"in a group where the model fails ({describe_groups(mine)}; see group_gap), leaving "
                         f"{len(bad)} ({share:.1%}, under the {t.confident_error_share:.0%} flag): these mistakes "
                         "are the group shift's, one cause, reported there."),
                evidence=tuple(every.sort_values("confidence", ascending=False)["image_id"].head(t.evidence)),
            ))
            continue
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
                + (f" {int(in_group.sum())} more lie in a group where the model fails ({describe_groups(mine)}; "
                   "see group_gap) and are not counted here." if in_group.any() else "")
            ),
            evidence=tuple(bad["image_id"].head(t.evidence)),
        ))
    return found


DETECTOR = Detector(
    kind="confident_error",
    detect=lambda tables, t: confident_errors(tables.audited, tables.signals, t),
    multi_label=False,
    support="association",
)
