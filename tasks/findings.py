"""Findings: flags for likely dataset bias and failure modes, computed with pandas over the tables.

Every finding carries the number that raised it (``metric``, ``value``), the ``threshold``
it crossed, a plain-words ``message`` (what was seen, why it matters, what to try) and
``evidence``: the image ids that show it, most telling first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from tasks.storage import table_schema

SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2}


@dataclass(frozen=True)
class Thresholds:
    """Documented, configurable thresholds (README: "Finding kinds")."""

    confident_error_confidence: float = 0.9  # a wrong prediction at least this confident is a confident error
    confident_error_share: float = 0.02  # flag a class when this share of its images are confident errors
    confused_pair_share: float = 0.10  # flag true->predicted pairs taking this share of the true class
    confused_pair_min_count: int = 3  # ... and at least this many images
    imbalance_ratio: float = 0.5  # flag a class whose share is below this fraction of the uniform share 1/K
    off_object_lift: float = 1.5  # flag a class whose median energy-in-box is below lift x box-area fraction
    min_class_images: int = 5  # classes with fewer audited images are not judged by per-class rates
    evidence: int = 8  # evidence image ids kept per finding
    sanity_max_spearman: float = 0.5  # a method whose maps keep this rank correlation after the
    # classifier and the explained stage are randomised fails the sanity check (Adebayo et al. 2018)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def compute_findings(
    predictions: pd.DataFrame,
    explanations: pd.DataFrame,
    classes: list[str],
    thresholds: Thresholds,
    multi_label: bool = False,
    layer: str | None = None,
) -> pd.DataFrame:
    """Run every detector; rows sorted most severe first, in the findings schema.

    ``layer`` is the explained layer: attention is judged on its maps (not on the shallow
    stages of a layer-by-layer run).
    """
    audited = predictions[predictions["error"].isna()]
    rows: list[dict] = []
    rows += class_imbalance(audited, classes, thresholds)
    if not multi_label:
        rows += confident_errors(audited, thresholds)
        rows += confused_pairs(audited, thresholds)
    if layer is not None and not explanations.empty:
        explanations = explanations[explanations["layer"] == layer]
    rows += attention_off_object(audited, explanations, thresholds)
    columns = table_schema("findings").names
    if not rows:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})
    frame = pd.DataFrame(rows)
    for name in columns:
        if name not in frame:
            frame[name] = None
    frame["_rank"] = frame["severity"].map(SEVERITY_ORDER)
    frame = frame.sort_values(["_rank", "value"], kind="stable").drop(columns="_rank")
    return frame[columns].reset_index(drop=True)


def _severity(value: float, high: float, medium: float, larger_is_worse: bool = True) -> str:
    if larger_is_worse:
        return "high" if value >= high else "medium" if value >= medium else "low"
    return "high" if value <= high else "medium" if value <= medium else "low"


def _true_class(audited: pd.DataFrame) -> pd.Series:
    """The single label of each image (multi-class data), None when it has zero or several."""
    return audited["labels"].map(lambda labels: labels[0] if labels is not None and len(labels) == 1 else None)


def class_imbalance(audited: pd.DataFrame, classes: list[str], t: Thresholds) -> list[dict]:
    """A class far rarer than the uniform share 1/K (Cleanlab flags frequency < 0.1/K as severe)."""
    counts = pd.Series(
        [label for labels in audited["labels"] if labels is not None for label in labels], dtype=object
    ).value_counts()
    total = counts.sum()
    if total == 0 or len(classes) < 2:
        return []
    rows = []
    for name in classes:
        share = counts.get(name, 0) / total
        ratio = share * len(classes)
        if ratio < t.imbalance_ratio:
            ids = audited.loc[audited["labels"].map(lambda ls, n=name: ls is not None and n in ls), "image_id"]
            rows.append(
                dict(
                    kind="class_imbalance",
                    severity=_severity(ratio, 0.1, 0.25, larger_is_worse=False),
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
                    evidence=ids.head(t.evidence).tolist(),
                )
            )
    return rows


def confident_errors(audited: pd.DataFrame, t: Thresholds) -> list[dict]:
    """Per true class, the share of images the model gets wrong with high confidence."""
    frame = audited.assign(true=_true_class(audited)).dropna(subset=["true"])
    frame = frame[frame["correct"].notna()]
    rows = []
    for name, group in frame.groupby("true", sort=True):
        if len(group) < t.min_class_images:
            continue
        bad = group[(group["correct"] == False) & (group["confidence"] >= t.confident_error_confidence)]  # noqa: E712
        share = len(bad) / len(group)
        if len(bad) == 0 or share < t.confident_error_share:
            continue
        bad = bad.sort_values("confidence", ascending=False)
        top_wrong = bad["predicted"].map(lambda p: p[0]).value_counts()
        rows.append(
            dict(
                kind="confident_error",
                severity=_severity(share, 0.10, 0.05),
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
                evidence=bad["image_id"].head(t.evidence).tolist(),
            )
        )
    return rows


def confused_pairs(audited: pd.DataFrame, t: Thresholds) -> list[dict]:
    """True class -> predicted class pairs that take a large share of the true class."""
    frame = audited.assign(true=_true_class(audited), pred=audited["predicted"].map(lambda p: p[0] if p else None))
    frame = frame.dropna(subset=["true", "pred"])
    sizes = frame.groupby("true").size()
    wrong = frame[frame["true"] != frame["pred"]]
    rows = []
    for (true, pred), group in wrong.groupby(["true", "pred"], sort=True):
        n_true = int(sizes[true])
        share = len(group) / n_true
        if n_true < t.min_class_images or len(group) < t.confused_pair_min_count or share < t.confused_pair_share:
            continue
        rows.append(
            dict(
                kind="confused_pair",
                severity=_severity(share, 0.25, 0.15),
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
                evidence=group.sort_values("confidence", ascending=False)["image_id"].head(t.evidence).tolist(),
            )
        )
    return rows


def attention_off_object(audited: pd.DataFrame, explanations: pd.DataFrame, t: Thresholds) -> list[dict]:
    """Per class, Grad-CAM energy inside the object box against a uniform map's (the box-area fraction).

    Uses each image's map for its own label(s). A model looking at the object puts far more
    than the area fraction of its map inside the box; one looking elsewhere (a mark, the
    background) puts about that much or less.
    """
    if explanations.empty or explanations["energy_in_box"].isna().all():
        return []
    maps = explanations[
        (explanations["method"] == "gradcam") & explanations["is_label"] & explanations["energy_in_box"].notna()
    ]
    maps = maps[maps["image_id"].isin(audited["image_id"])]
    rows = []
    for (name, layer), group in maps.groupby(["target", "layer"], sort=True):
        if len(group) < t.min_class_images:
            continue
        energy = float(group["energy_in_box"].median())
        area = float(group["box_area_fraction"].median())
        lift = energy / area if area > 0 else np.inf
        if lift >= t.off_object_lift:
            continue
        hits = group["pointing_hit"].astype("float").mean()
        outside = group.sort_values("energy_in_box")
        rows.append(
            dict(
                kind="attention_off_object",
                severity=_severity(lift, 1.0, 1.25, larger_is_worse=False),
                class_name=str(name),
                slice=f"layer={layer}",
                metric="energy_in_box_lift",
                value=float(lift),
                threshold=t.off_object_lift,
                message=(
                    f"For '{name}', the median Grad-CAM energy inside the object box is {energy:.1%} "
                    f"while the box covers {area:.1%} of the image ({lift:.2f}x a uniform map); "
                    f"the map's peak falls in the box for {hits:.0%} of images. The model's evidence "
                    "for this class lies mostly outside the object (background, marks, context): "
                    "look at the evidence maps, and remove or balance that cue in the training data."
                ),
                evidence=outside["image_id"].head(t.evidence).tolist(),
            )
        )
    return rows
