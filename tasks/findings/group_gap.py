"""``group_gap``: a class that fails within one value of an attribute (a group shift).

A slice can look fine while a class inside it fails: with two backgrounds and a balanced
test split (the Waterbirds case, Sagawa et al. 2020), "waterbird on land" can be wrong
nearly always while each background's accuracy is average. So per manifest attribute, per
class c and value v, the accuracy of the group (c, v) is compared with that of class c at
the attribute's other values, with Newcombe's hybrid score interval for the difference
(``stats.difference_interval``), Bonferroni-corrected over the groups tested at
``slice_confidence``. A group is failing when the whole interval lies above
``slice_margin``. Groups under ``min_group_images`` (or whose class has fewer elsewhere)
are not judged. A value on which every class fails is a slice, not a group: ``slice_gap``
reports it, and this detector leaves the values ``slice_gap`` flags alone.

One finding per attribute (one cause), naming the worst group; its message lists every
failing group with its numbers, and the worst-group accuracy against the class's average.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from visaudit.tasks.data.columns import is_in
from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.inputs import shared, true_class
from visaudit.tasks.findings.slice_gap import attribute_table, slice_gap
from visaudit.tasks.findings.stats import difference_interval
from visaudit.tasks.findings.thresholds import Thresholds, severity


@dataclass(frozen=True)
class GroupGap:
    """One failing (class, attribute value) group and its comparison with the class elsewhere."""

    attribute: str
    value: str
    class_name: str
    correct: int  # right in the group
    images: int  # in the group
    correct_elsewhere: int  # right among the class's images with another value
    images_elsewhere: int
    low: float  # interval of the gap (elsewhere - group accuracy)
    high: float
    image_ids: tuple[str, ...]  # every image of the group, its errors first (most confident first)

    @property
    def gap(self) -> float:
        """Accuracy of the class elsewhere minus its accuracy in the group."""
        return self.correct_elsewhere / self.images_elsewhere - self.correct / self.images


@shared
def failing_groups(audited: pd.DataFrame, signals: pd.DataFrame, t: Thresholds) -> list[GroupGap]:
    """Every (class, attribute value) group surely weaker than its class elsewhere, worst first;
    values that ``slice_gap`` flags (a whole-slice failure) are left out."""
    if "correct" not in audited or "attributes" not in audited:
        return []
    judged = audited["correct"].notna().to_numpy()
    frame = attribute_table(audited).assign(**{"class": true_class(audited)[judged].to_numpy()})
    frame = frame[frame["class"].notna()]
    slices = {f.slice for f in slice_gap(audited, signals, t)}
    candidates = []
    for column in [c for c in frame.columns if c.startswith("attr:")]:
        values = frame[column].dropna()
        if values.nunique() < 2 or values.nunique() > t.max_slice_values:
            continue
        groups = frame.groupby(["class", column])["correct"].agg(["size", "sum"])
        per_class = frame[frame[column].notna()].groupby("class")["correct"].agg(["size", "sum"])
        for (name, value), n, k in zip(groups.index, groups["size"], groups["sum"]):
            n_else, k_else = per_class.at[name, "size"] - n, per_class.at[name, "sum"] - k  # its other values
            if n >= t.min_group_images and n_else >= t.min_group_images:
                candidates.append((column, str(name), value, (k, n, k_else, n_else)))
    if not candidates:
        return []
    z = NormalDist().inv_cdf(1 - (1 - t.slice_confidence) / (2 * len(candidates)))
    found = []
    for column, name, value, counts in candidates:
        attribute = column.removeprefix("attr:")
        if f"{attribute}={value}" in slices:
            continue
        k1, n1, k2, n2 = (np.float64(v) for v in counts)
        low, high = difference_interval(k1, n1, k2, n2, z)
        if low <= t.slice_margin:
            continue
        inside = (frame["class"] == name).to_numpy() & (frame[column] == value).to_numpy()
        group = frame[inside].sort_values(["correct", "confidence"], ascending=[True, False], kind="stable")
        found.append(GroupGap(attribute, str(value), name, int(k1), int(n1), int(k2), int(n2), float(low), float(high),
                              tuple(group["image_id"])))
    return sorted(found, key=lambda g: -g.gap)


def describe_groups(groups: list[GroupGap]) -> str:
    """The failing groups in words: "'waterbird' with place=land, ..."."""
    return ", ".join(dict.fromkeys(f"'{g.class_name}' with {g.attribute}={g.value}" for g in groups))


def in_failing_group(ids: pd.Series, groups: list[GroupGap], class_name: str) -> tuple[pd.Series, list[GroupGap]]:
    """Which of ``ids`` (images of ``class_name``) lie in one of its failing groups, and those groups."""
    mine = [g for g in groups if g.class_name == class_name]
    return pd.Series(is_in(ids, {i for g in mine for i in g.image_ids}), index=ids.index), mine


def group_gap(audited: pd.DataFrame, signals: pd.DataFrame, t: Thresholds) -> list[Finding]:
    """One finding per attribute with failing groups, on its worst group; evidence the failing
    groups' errors, worst group first."""
    groups = failing_groups(audited, signals, t)
    found = []
    for attribute in dict.fromkeys(g.attribute for g in groups):
        mine = [g for g in groups if g.attribute == attribute]
        worst = mine[0]
        total_k = worst.correct + worst.correct_elsewhere
        total_n = worst.images + worst.images_elsewhere
        lines = "; ".join(
            f"'{g.class_name}' with {attribute}={g.value}: {g.correct / g.images:.0%} right ({g.correct} of "
            f"{g.images}) against {g.correct_elsewhere / g.images_elsewhere:.0%} at its other values "
            f"(gap {g.gap:.0%}, interval {g.low:.0%} to {g.high:.0%})"
            for g in mine
        )
        errors = [i for g in mine for i in g.image_ids[: g.images - g.correct]]
        found.append(Finding(
            kind="group_gap",
            severity=severity(worst.gap, 0.2, 0.1),
            class_name=worst.class_name,
            slice=f"{attribute}={worst.value}",
            metric="group_accuracy_gap",
            value=worst.gap,
            threshold=t.slice_margin,
            message=(
                f"Within the attribute '{attribute}', {len(mine)} group(s) of a class fail where the class "
                f"does not: {lines} (intervals at {t.slice_confidence:.0%}, corrected over the groups tested; "
                f"margin {t.slice_margin:.0%}). Worst-group accuracy {worst.correct / worst.images:.0%} against "
                f"{total_k / total_n:.0%} for '{worst.class_name}' as a whole. The model ties the class to "
                f"'{attribute}' (a spurious correlation in training): its errors there are the group's, not "
                "wrong labels. Balance the groups in training (collect, reweight or group-DRO) and report "
                "worst-group accuracy."
            ),
            evidence=tuple(errors[: t.evidence]),
        ))
    return found


DETECTOR = Detector(
    kind="group_gap",
    detect=lambda tables, t: group_gap(tables.audited, tables.signals, t),
    support="comparison",
)
