"""``class_imbalance``: a class far rarer than the uniform share 1/K.

Its share of the audited images' labels times K (1.0 = the uniform share) below
``imbalance_ratio`` is flagged; Cleanlab's rule (frequency < 0.1/K) is the high band.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.inputs import listed
from visaudit.tasks.findings.thresholds import Thresholds, severity


def class_imbalance(audited: pd.DataFrame, classes: list[str], t: Thresholds) -> list[Finding]:
    """One finding per class whose share of the labels is below ``imbalance_ratio`` x 1/K."""
    rows, names = listed(audited["labels"])
    counts = pd.Series(names, dtype=object).value_counts()
    total = counts.sum()
    if total == 0 or len(classes) < 2:
        return []
    found = []
    for name in classes:
        share = counts.get(name, 0) / total
        ratio = share * len(classes)
        if ratio >= t.imbalance_ratio:
            continue
        ids = audited["image_id"].iloc[np.unique(rows[names == name])]
        found.append(Finding(
            kind="class_imbalance",
            severity=severity(ratio, 0.1, 0.25, larger_is_worse=False),
            class_name=name,
            metric="share_vs_uniform",
            value=float(ratio),
            threshold=t.imbalance_ratio,
            message=(
                f"Class '{name}' has {counts.get(name, 0)} of {total} images ({share:.1%}), "
                f"{ratio:.2f}x the uniform share of {1 / len(classes):.1%}. Its accuracy figures rest "
                "on few examples and the model may under-predict it; collect more images of it or "
                "reweight it in training."
            ),
            evidence=tuple(ids.head(t.evidence)),
        ))
    return found


DETECTOR = Detector(
    kind="class_imbalance",
    detect=lambda tables, t: class_imbalance(tables.audited, tables.classes, t),
)
