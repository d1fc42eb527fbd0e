"""``likely_label_error``: images whose label confident learning finds likely wrong.

Confident learning (Northcutt, Jiang and Chuang 2021) via cleanlab: with per-class
thresholds t_j = mean p_j over the images labelled j, an image labelled i whose probability
for another class j reaches t_j is counted in the confident joint C[i][j]; its calibrated
off-diagonal sum estimates how many labels are wrong, and that many images, those of lowest
self-confidence p_i (the probability the model gives their label), are flagged
(``filter_by="low_self_confidence"``, the rule cleanlab's batched search approximates). The
default rule (``prune_by_noise_rate``, per cell C[i][j] the images of largest margin
p_j - p_i) takes images the model half-believes (p_i ~ 0.4) in a cell whose count is high
and misses labels the model gives 0.002 in a cell whose count is low: on a planted 10% flip
with an 85%-accurate model it listed 30 images, 16 of the 24 flipped; this rule listed 25,
19 of them. The flag needs out-of-sample
probabilities (``signals.probabilities``): audit a held-out split, not the training set.
Multi-class runs only.

On clean labels, confident learning still flags the model's own confident errors (a clean
set the model gets 10% wrong shows ~10% "issues"): from one model's probabilities, a wrong
label and a model error look alike image by image. What tells them apart is how often the
labels are surprising: if the model is calibrated and the labels are right, image n's label
is drawn from its probabilities p_n, so the count of given labels the model gives at most
tau (``label_error_probability``), O = sum_n 1[p_{n,y_n} <= tau], has expectation
E = sum_n sum_k p_{nk} 1[p_{nk} <= tau]. Label noise is supported only when O surely exceeds
E: P(Poisson(E) >= O) <= 1 - ``label_error_confidence`` over the run, and a class gets a
row only when its own labels show an excess, O_c > E_c (the same counts restricted to the
given label c and to class c's probabilities; its p-value is quoted), so a noisy class does
not raise rows on clean ones (for O >= E + 1 the Poisson tail is
at least the Poisson-binomial's, Anderson and Samuels 1967, so the test is conservative).
Otherwise the flagged images are model errors (``confident_error``, ``confused_pair`` show
them) and nothing is raised. An overconfident model also makes O exceed E; the message says
so.

A group shift makes errors that look like label errors: the model is confidently wrong on
a group (say "waterbird on land") whose labels are right. Flagged images that lie in a
failing group (``group_gap.failing_groups``), or, without metadata, in a failing cluster of
look-alike images of the class (``error_slice.error_clusters``), are therefore not counted
as label errors: the evidence (the errors concentrate in one kind of image of the class,
where the class elsewhere is right; random wrong labels do not) supports the group shift. The class's finding says how many were set aside, and a
class whose flagged images are all explained so gets a low row that says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import pdtrc  # Poisson's survival function, without scipy.stats' import (~0.9 s)

from visaudit.tasks.data.columns import is_in
from visaudit.tasks.findings.error_slice import ErrorCluster, error_clusters
from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.group_gap import GroupGap, describe_groups, failing_groups, in_failing_group
from visaudit.tasks.findings.inputs import signal_rows, stacked, true_class
from visaudit.tasks.findings.thresholds import Thresholds, severity


@dataclass(frozen=True)
class LabelSurprise:
    """How often given labels get at most ``tau`` from the model, against what its probabilities predict."""

    tau: float
    observed: int  # O: given labels with model probability <= tau
    expected: float  # E: the count calibrated probabilities and right labels predict
    p_value: float  # P(Poisson(E) >= O)


def label_surprise(labels: np.ndarray, probs: np.ndarray, tau: float) -> LabelSurprise:
    """O = sum_n 1[p_{n,y_n} <= tau] against E = sum_n sum_k p_{nk} 1[p_{nk} <= tau], with the
    one-sided Poisson p-value P(Poisson(E) >= O); ``labels`` are class positions, ``probs`` (n, K)."""
    if probs.ndim != 2 or len(labels) != len(probs):
        raise ValueError(f"labels ({len(labels)}) and probabilities {probs.shape} must describe the same images")
    observed = int((probs[np.arange(len(labels)), labels] <= tau).sum())
    expected = float(np.where(probs <= tau, probs, 0.0).sum())
    p_value = float(pdtrc(observed - 1, expected)) if observed else 1.0
    return LabelSurprise(tau, observed, expected, p_value)


def likely_label_errors(
    audited: pd.DataFrame, signals: pd.DataFrame, classes: list[str], t: Thresholds
) -> list[Finding]:
    """Per given class, the images whose label confident learning finds likely wrong (all of
    them, least likely label first), images of failing groups set aside."""
    from cleanlab.filter import find_label_issues

    given, rows = true_class(audited), signal_rows(audited, signals)
    keep = given.isin(classes).to_numpy() & (rows >= 0)
    frame = pd.DataFrame({"image_id": audited["image_id"][keep].reset_index(drop=True),
                          "given": given[keep].reset_index(drop=True)})
    if len(frame) < 2 * len(classes) or frame["given"].nunique() < 2:
        return []
    position = {name: i for i, name in enumerate(classes)}
    labels = frame["given"].map(position).to_numpy()
    probs = stacked(signals["probabilities"], np.float64, rows[keep])
    probs = probs / probs.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():  # cleanlab's "may not flag all label issues in class k" about small classes:
        warnings.filterwarnings("ignore", message="May not flag all label issues", category=UserWarning)
        ranked = find_label_issues(labels, probs, filter_by="low_self_confidence",
                                   return_indices_ranked_by="self_confidence", n_jobs=1)  # no fork
    suggested = np.asarray(classes, dtype=object)[probs[ranked].argmax(axis=1)]
    flagged = frame.iloc[ranked].assign(suggested=suggested.tolist())
    sizes = frame["given"].value_counts()
    groups = failing_groups(audited, signals, t)
    clusters = error_clusters(audited, signals, t)
    outside = ~is_in(frame["image_id"], {i for g in [*groups, *clusters] for i in g.image_ids})
    surprise = label_surprise(labels[outside], probs[outside], t.label_error_probability)
    supported = surprise.p_value <= 1 - t.label_error_confidence
    found = []
    for name, everything in flagged.groupby("given", sort=True):
        n = int(sizes[name])
        in_group, mine = in_failing_group(everything["image_id"], groups, name)
        mine_clusters = [c for c in clusters if c.class_name == name]
        in_group |= is_in(everything["image_id"], {i for c in mine_clusters for i in c.image_ids})
        group, set_aside = everything[~in_group], int(in_group.sum())
        where, verdict = _where(mine, mine_clusters, str(name))
        share = len(group) / n
        if n < t.min_class_images:
            continue
        if share < t.label_error_share or len(group) < t.label_error_min_count:
            if set_aside >= t.label_error_min_count:
                found.append(Finding(
                    kind="likely_label_error", severity="low", class_name=str(name),
                    slice=f"explained={'group_gap' if mine else 'error_slice'}",
                    metric="likely_label_error_share", value=float(share), threshold=t.label_error_share,
                    message=(f"Confident learning flags {len(everything)} of {n} images labelled '{name}' as "
                             f"likely mislabelled, but {set_aside} of them lie {where}, leaving {len(group)} "
                             f"({share:.1%}, under the {t.label_error_share:.0%} flag): {verdict}. Do not relabel "
                             "them; check a few to be sure."),
                    evidence=tuple(everything["image_id"]),
                ))
            continue
        if not supported:
            continue
        mine_outside = outside & (labels == position[name])
        observed = int((probs[mine_outside, position[name]] <= t.label_error_probability).sum())
        column = probs[outside, position[name]]
        expected = float(column[column <= t.label_error_probability].sum())
        class_p = float(pdtrc(observed - 1, expected)) if observed else 1.0
        if observed <= expected:  # the run's excess lies in other classes: this one's labels show none
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
                    "images), beyond the per-class thresholds of confident learning. The labels are more "
                    f"surprising than the model's errors explain: across the run {surprise.observed} given labels "
                    f"get at most {t.label_error_probability:.0%} from the model where its own probabilities "
                    f"predict {surprise.expected:.1f} (Poisson p = {surprise.p_value:.2g}), {observed} of them in "
                    f"'{name}' against {expected:.1f} predicted (p = {class_p:.2g}); "
                    f"the excess, {surprise.observed - surprise.expected:.0f}, is "
                    "a floor on the wrong labels run-wide (a wrong label the model gives more is not counted), unless "
                    "the model is overconfident (see calibration). Wrong labels bias both "
                    "training and every accuracy figure: review these images (all are listed, least "
                    "likely label first) and fix their labels before retraining or reporting accuracy. Where "
                    "a label is right, the model is confidently wrong instead (see confused pairs)."
                    + (f" {set_aside} more flagged image(s) lie {where} and are not counted: {verdict} there."
                       if set_aside else "")
                ),
                evidence=tuple(group["image_id"]),
            )
        )
    return found


def _where(groups: list[GroupGap], clusters: list[ErrorCluster], name: str) -> tuple[str, str]:
    """Where the set-aside images lie, in words, and what the evidence then supports."""
    places = ([f"in a group where the model fails ({describe_groups(groups)}; see group_gap)"] if groups else []) + (
        [f"in {len(clusters)} cluster(s) of look-alike '{name}' images where the model fails (see error_slice)"]
        if clusters else [])
    if groups:
        return " or ".join(places), "their errors follow the group, so the evidence supports a group shift, not wrong labels"
    return "".join(places), ("their errors concentrate in images that look alike, which wrong labels drawn at random would "
                       "not do, so the evidence supports a failure on a kind of image, not wrong labels")


DETECTOR = Detector(
    kind="likely_label_error",
    detect=lambda tables, t: likely_label_errors(tables.audited, tables.signals, tables.classes, t),
    needs=("signals",),
    multi_label=False,
    support="comparison",
)
