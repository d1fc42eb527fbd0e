"""``confused_pair``: true class -> predicted class pairs that take a large share of the true
class (``confused_pair_share``, at least ``confused_pair_min_count`` images). Multi-class runs only.

One finding per cause: confusions that lie in a failing group of the true class
(``group_gap.failing_groups``) are that group's and not counted; a pair that is flagged
only with them gets a low row that says so ("explained=group_gap")."""

from __future__ import annotations

import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.group_gap import describe_groups, failing_groups, in_failing_group
from visaudit.tasks.findings.inputs import true_class
from visaudit.tasks.findings.thresholds import Thresholds, severity


def confused_pairs(audited: pd.DataFrame, signals: pd.DataFrame, t: Thresholds) -> list[Finding]:
    """One finding per (true, predicted) pair over the thresholds outside the true class's
    failing groups; evidence most confident first."""
    frame = audited[["image_id", "confidence"]].assign(
        true=true_class(audited), pred=audited["predicted"].map(lambda p: p[0] if p else None))
    frame = frame.dropna(subset=["true", "pred"])
    sizes = frame.groupby("true").size()
    wrong = frame[frame["true"] != frame["pred"]]
    groups = failing_groups(audited, signals, t)
    found = []
    for (true, pred), every in wrong.groupby(["true", "pred"], sort=True):
        n_true = int(sizes[true])
        if n_true < t.min_class_images or len(every) < t.confused_pair_min_count or len(every) / n_true < t.confused_pair_share:
            continue
        in_group, mine = in_failing_group(every["image_id"], groups, str(true))
        group = every[~in_group]
        share = len(group) / n_true
        explained = len(group) < t.confused_pair_min_count or share < t.confused_pair_share
        total = len(every) / n_true
        aside = (f" {int(in_group.sum())} of them lie in a group where the model fails ({describe_groups(mine)}; see "
                 "group_gap)") if in_group.any() else ""
        found.append(Finding(
            kind="confused_pair",
            severity="low" if explained else severity(share, 0.25, 0.15),
            class_name=str(true),
            slice="explained=group_gap" if explained else f"predicted={pred}",
            metric="confused_share",
            value=float(total if explained else share),
            threshold=t.confused_pair_share,
            message=(
                f"{len(every)} of {n_true} '{true}' images ({total:.1%}) are predicted as '{pred}',{aside} leaving "
                f"{len(group)} ({share:.1%}, under the flag): the confusion is the group shift's, one cause, "
                "reported there." if explained else
                f"{len(group)} of {n_true} '{true}' images ({share:.1%}) are predicted as '{pred}'"
                + (f" ({aside.strip()}, not counted)" if aside else "") + ". "
                f"Compare the maps of both classes on these images: if the model looks at the same "
                f"cue for both, add training images that separate '{true}' from '{pred}'."
            ),
            evidence=tuple((every if explained else group).sort_values("confidence", ascending=False)["image_id"]
                           .head(t.evidence)),
        ))
    return found


DETECTOR = Detector(
    kind="confused_pair",
    detect=lambda tables, t: confused_pairs(tables.audited, tables.signals, t),
    multi_label=False,
    support="association",
)
