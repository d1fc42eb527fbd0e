"""``likely_label_error``: images whose label confident learning finds likely wrong.

Confident learning (Northcutt, Jiang and Chuang 2021) via cleanlab: with per-class
thresholds t_j = mean p_j over the images labelled j, an image labelled i whose probability
for another class j reaches t_j is counted in the confident joint C[i][j]; the images to
prune are those off the diagonal, ranked by self-confidence p_i. It needs out-of-sample
probabilities (``signals.probabilities``): audit a held-out split, not the training set.
Multi-class runs only.

A group shift makes errors that look like label errors: the model is confidently wrong on
a group (say "waterbird on land") whose labels are right. Flagged images that lie in a
failing group (``group_gap.failing_groups``) are therefore not counted as label errors: the
evidence (the errors concentrate in one group of the class, where the class elsewhere is
right) supports the group shift. The class's finding says how many were set aside, and a
class whose flagged images are all explained so gets a low row that says so.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.group_gap import describe_groups, failing_groups, in_failing_group
from visaudit.tasks.findings.thresholds import Thresholds, severity


def likely_label_errors(
    audited: pd.DataFrame, signals: pd.DataFrame, classes: list[str], t: Thresholds
) -> list[Finding]:
    """Per given class, the images whose label confident learning finds likely wrong (all of
    them, least likely label first), images of failing groups set aside."""
    from cleanlab.filter import find_label_issues

    frame = audited[audited["labels"].map(lambda ls: ls is not None and len(ls) == 1)]
    frame = frame.assign(given=frame["labels"].map(lambda ls: ls[0]))
    frame = frame[frame["given"].isin(classes)].merge(signals[["image_id", "probabilities"]], on="image_id")
    if len(frame) < 2 * len(classes) or frame["given"].nunique() < 2:
        return []
    position = {name: i for i, name in enumerate(classes)}
    labels = frame["given"].map(position).to_numpy()
    probs = np.stack(frame["probabilities"].to_numpy()).astype(np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():  # cleanlab's "may not flag all label issues in class k" about small classes:
        warnings.filterwarnings("ignore", message="May not flag all label issues", category=UserWarning)
        ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)  # no fork
    flagged = frame.iloc[ranked].assign(suggested=[classes[i] for i in probs[ranked].argmax(axis=1)])
    sizes = frame["given"].value_counts()
    groups = failing_groups(audited, signals, t)
    found = []
    for name, everything in flagged.groupby("given", sort=True):
        n = int(sizes[name])
        in_group, mine = in_failing_group(everything["image_id"], groups, name)
        group, set_aside = everything[~in_group], int(in_group.sum())
        share = len(group) / n
        if n < t.min_class_images:
            continue
        if share < t.label_error_share or len(group) < t.label_error_min_count:
            if set_aside >= t.label_error_min_count:
                found.append(Finding(
                    kind="likely_label_error", severity="low", class_name=str(name), slice="explained=group_gap",
                    metric="likely_label_error_share", value=float(share), threshold=t.label_error_share,
                    message=(f"Confident learning flags {len(everything)} of {n} images labelled '{name}' as "
                             f"likely mislabelled, but {set_aside} of them lie in a group where the model fails "
                             f"({describe_groups(mine)}; see group_gap), leaving {len(group)} ({share:.1%}, under the "
                             f"{t.label_error_share:.0%} flag): their errors follow the group, so the evidence "
                             "supports a group shift, not wrong labels. Do not relabel them; check a few to be sure."),
                    evidence=tuple(everything["image_id"]),
                ))
            continue
        suggested = group["suggested"].value_counts()
        found.append(
            Finding(
                kind="likely_label_error",
                severity=severity(share, 0.15, 0.05),
                class_name=str(name),
                slice=f"suggested={suggested.index[0]}",
                metric="likely_label_error_share",
                value=float(share),
                threshold=t.label_error_share,
                message=(
                    f"{len(group)} of {n} images labelled '{name}' ({share:.1%}) look mislabelled: the model is "
                    f"confident they are another class (mostly '{suggested.index[0]}', {suggested.iloc[0]} "
                    "images), beyond the per-class thresholds of confident learning. Wrong labels bias both "
                    "training and every accuracy figure: review these images (all are listed, least "
                    "likely label first) and fix their labels before retraining or reporting accuracy. Where "
                    "a label is right, the model is confidently wrong instead (see confused pairs)."
                    + (f" {set_aside} more flagged image(s) lie in a group where the model fails ({describe_groups(mine)}; "
                       "see group_gap) and are not counted: their errors follow the group, so the evidence "
                       "supports a group shift there, not wrong labels." if set_aside else "")
                ),
                evidence=tuple(group["image_id"]),
            )
        )
    return found


DETECTOR = Detector(
    kind="likely_label_error",
    detect=lambda tables, t: likely_label_errors(tables.audited, tables.signals, tables.classes, t),
    needs=("signals",),
    multi_label=False,
)
