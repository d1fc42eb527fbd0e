"""``likely_label_error``: images whose label confident learning finds likely wrong.

Confident learning (Northcutt, Jiang and Chuang 2021) via cleanlab: with per-class
thresholds t_j = mean p_j over the images labelled j, an image labelled i whose probability
for another class j reaches t_j is counted in the confident joint C[i][j]; the images to
prune are those off the diagonal, ranked by self-confidence p_i. It needs out-of-sample
probabilities (``signals.probabilities``): audit a held-out split, not the training set.
Multi-class runs only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.thresholds import Thresholds, severity


def likely_label_errors(
    audited: pd.DataFrame, signals: pd.DataFrame, classes: list[str], t: Thresholds
) -> list[Finding]:
    """Per given class, the images whose label confident learning finds likely wrong (all of
    them, least likely label first)."""
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
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)  # no fork
    flagged = frame.iloc[ranked].assign(suggested=[classes[i] for i in probs[ranked].argmax(axis=1)])
    sizes = frame["given"].value_counts()
    found = []
    for name, group in flagged.groupby("given", sort=True):
        n = int(sizes[name])
        share = len(group) / n
        if n < t.min_class_images or share < t.label_error_share or len(group) < t.label_error_min_count:
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
