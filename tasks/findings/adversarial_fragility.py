"""``adversarial_fragility``: per original class, the share of its attacked images whose
prediction flips under a tiny L-inf perturbation (PGD, ``explain.adversarial``; the Grad-CAM
paper's sec. 6.2 experiment turned into a robustness score). Multi-class runs with
``--adversarial-images`` only.

An image is fooled at a tiny budget when the attack succeeds at some budget of the ladder at
most ``adversarial_epsilon`` (in 1/255 of the [0, 1] pixel range). With k of n attacked
images of the class fooled, the class is flagged when the Wilson 95% lower end of k / n is at
least ``adversarial_share``: most of the class surely flips. A model whose output does not
move under such budgets (a robust or a constant model) stays silent; a model that flips
under them is fragile whatever else it learnt, and the message says how confident its clean
predictions were, so a reader sees whether the flips come from near-guesses or from
confident predictions, and whether Grad-CAM of the original class still points where it did.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.stats import Z_95, wilson_interval
from visaudit.tasks.findings.thresholds import Thresholds, severity

MAP_KEPT = 0.5  # the message says the original class's map "stayed" at a median Spearman rho of at least this


def fragile_classes(adversarial: pd.DataFrame, classes: list[str], t: Thresholds) -> list[Finding]:
    """One finding per original class surely fooled at a tiny budget; evidence: the fooled
    images, smallest budget first, then the most confident adversarial prediction."""
    budget = adversarial["epsilon"].astype(float) * 255
    tiny = adversarial[budget <= t.adversarial_epsilon + 1e-6]
    if tiny.empty:
        return []
    largest = float(tiny["epsilon"].max() * 255)
    found = []
    for name, rows in tiny.groupby("target", sort=True):
        n = rows["image_id"].nunique()
        hits = rows[rows["success"].astype(bool)].sort_values(["epsilon", "adversarial_confidence"],
                                                              ascending=[True, False], kind="stable")
        first = hits.drop_duplicates("image_id")  # each fooled image at its smallest fooling budget
        k = len(first)
        if k == 0:
            continue
        low, _ = (float(v) for v in wilson_interval(np.float64(k), np.float64(n), Z_95))
        if low < t.adversarial_share:
            continue
        found.append(Finding(
            kind="adversarial_fragility", severity=severity(low, 0.8, 0.0), class_name=str(name),
            slice=f"epsilon<={largest:g}/255", metric="adversarial_success_rate", value=k / n,
            threshold=t.adversarial_share, message=_message(str(name), first, k, n, low, largest, len(classes)),
            evidence=tuple(first["image_id"].head(t.evidence)),
        ))
    return found


def _message(name: str, first: pd.DataFrame, k: int, n: int, low: float, largest: float, num_classes: int) -> str:
    """What the fooled images' rows show, every number from them."""
    target = first["adversarial_class"].value_counts()
    steps = int(first["steps"].iloc[0])
    clean = float(first["clean_confidence"].median())
    rho = first["spearman"].dropna()
    text = (f"{k} of {n} attacked '{name}' images ({k / n:.0%}; 95% lower bound {low:.0%}) change their prediction "
            f"under a perturbation of at most {largest:g}/255 per pixel (L-inf PGD, {steps} steps), most often to "
            f"'{target.index[0]}' ({int(target.iloc[0])} of {k}, median confidence "
            f"{float(first['adversarial_confidence'].median()):.2f}). Their clean confidence in '{name}' was a median "
            f"{clean:.2f} (a guess among {num_classes} classes: {1 / num_classes:.2f}).")
    if len(rho):
        median = float(rho.median())
        where = "still ranks the same cells first" if median >= MAP_KEPT else "moved as well"
        text += (f" Grad-CAM of '{name}' on the adversarial images {where}: median Spearman rho {median:.2f} with "
                 "its clean map.")
    boxed = first[first["pointing_hit_clean"].notna() & first["pointing_hit"].notna()]
    if len(boxed):
        text += (f" It points into the object box on {int(boxed['pointing_hit'].astype(bool).sum())} of {len(boxed)} "
                 f"(clean: {int(boxed['pointing_hit_clean'].astype(bool).sum())}).")
    return text + (" The decision is not robust to noise a person cannot see: do not rely on it where inputs can "
                   "be manipulated; adversarial training or noise augmentation may help.")


DETECTOR = Detector(
    kind="adversarial_fragility",
    detect=lambda tables, t: fragile_classes(tables.adversarial, tables.classes, t),
    needs=("adversarial",),
    multi_label=False,
)
