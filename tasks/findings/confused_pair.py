"""``confused_pair``: true class -> predicted class pairs that take a large share of the true
class (``confused_pair_share``, at least ``confused_pair_min_count`` images). Multi-class runs only."""

from __future__ import annotations

import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.inputs import true_class
from visaudit.tasks.findings.thresholds import Thresholds, severity


def confused_pairs(audited: pd.DataFrame, t: Thresholds) -> list[Finding]:
    """One finding per (true, predicted) pair over the thresholds; evidence most confident first."""
    frame = audited.assign(true=true_class(audited), pred=audited["predicted"].map(lambda p: p[0] if p else None))
    frame = frame.dropna(subset=["true", "pred"])
    sizes = frame.groupby("true").size()
    wrong = frame[frame["true"] != frame["pred"]]
    found = []
    for (true, pred), group in wrong.groupby(["true", "pred"], sort=True):
        n_true = int(sizes[true])
        share = len(group) / n_true
        if n_true < t.min_class_images or len(group) < t.confused_pair_min_count or share < t.confused_pair_share:
            continue
        found.append(Finding(
            kind="confused_pair",
            severity=severity(share, 0.25, 0.15),
            class_name=str(true),
            slice=f"predicted={pred}",
            metric="confused_share",
            value=float(share),
            threshold=t.confused_pair_share,
            message=(
                f"{len(group)} of {n_true} '{true}' images ({share:.1%}) are predicted as '{pred}'. "
                f"Compare the maps of both classes on these images: if the model looks at the same "
                f"cue for both, add training images that separate '{true}' from '{pred}'."
            ),
            evidence=tuple(group.sort_values("confidence", ascending=False)["image_id"].head(t.evidence)),
        ))
    return found


DETECTOR = Detector(
    kind="confused_pair",
    detect=lambda tables, t: confused_pairs(tables.audited, t),
    multi_label=False,
)
