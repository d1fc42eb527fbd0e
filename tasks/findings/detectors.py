"""Findings: flags for likely dataset bias and failure modes, computed with pandas over the tables.

Every finding carries the number that raised it (``metric``, ``value``), the ``threshold``
it crossed, a plain-words ``message`` (what was seen, why it matters, what to try) and
``evidence``: the image ids that show it, most telling first.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from visaudit.tasks.findings.dataset_issues import likely_label_errors, near_duplicates
from visaudit.tasks.findings.fixed_location import LocationCandidate, LocationProbe, attention_fixed_location
from visaudit.tasks.findings.shortcuts import shortcut_property, slice_gap
from visaudit.tasks.data.storage import table_schema
from visaudit.tasks.findings.thresholds import SEVERITY_ORDER, Thresholds, severity

__all__ = ["Thresholds", "compute_findings"]
MAP_BASED = ("attention_off_object", "attention_fixed_location")  # kinds whose evidence is the class's maps
KIND_ORDER = (  # within a severity: what the model learnt wrong first, then its errors, then the data
    "attention_fixed_location", "shortcut_property", "attention_off_object", "slice_gap", "unfaithful_explanation",
    "confident_error", "confused_pair", "likely_label_error", "near_duplicate", "class_imbalance",
)


def compute_findings(
    predictions: pd.DataFrame,
    explanations: pd.DataFrame,
    classes: list[str],
    thresholds: Thresholds,
    multi_label: bool = False,
    layer: str | None = None,
    *,
    signals: pd.DataFrame | None = None,
    occlusion: pd.DataFrame | None = None,
    metrics: pd.DataFrame | None = None,
    locations: tuple[list[LocationCandidate], dict[str, LocationProbe]] | None = None,
) -> pd.DataFrame:
    """Run every detector; rows sorted most severe first, in the findings schema.

    ``layer`` is the explained layer: attention is judged on its maps (not on the shallow
    stages of a layer-by-layer run). ``signals`` (per-image embeddings, probabilities and
    properties), ``occlusion`` and ``metrics`` feed the detectors that need them;
    ``locations`` are the fixed-location candidates with their probe results (they need
    the model, so the flow runs them). A detector whose input is missing is skipped.
    Map-based findings on a class whose explanations fail a faithfulness check get
    ``confidence`` "low" and the reason.
    """
    audited = predictions[predictions["error"].isna()]
    signals = signals if signals is not None else pd.DataFrame()
    rows: list[dict] = []
    rows += class_imbalance(audited, classes, thresholds)
    if not multi_label:
        rows += confident_errors(audited, thresholds)
        rows += confused_pairs(audited, thresholds)
    if layer is not None and not explanations.empty:
        explanations = explanations[explanations["layer"] == layer]
    rows += attention_off_object(audited, explanations, thresholds)
    if locations is not None:
        rows += attention_fixed_location(*locations, thresholds)
    if not signals.empty:
        rows += shortcut_property(audited, signals, classes, thresholds)
        if not multi_label:
            rows += likely_label_errors(audited, signals, classes, thresholds)
        rows += near_duplicates(audited, signals, thresholds)
    if "correct" in audited:
        rows += slice_gap(audited, signals, thresholds)
    unfaithful = unfaithful_explanations(occlusion, metrics, layer, classes, thresholds)
    rows += unfaithful
    _mark_low_confidence(rows, unfaithful)
    columns = table_schema("findings").names
    if not rows:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})
    frame = pd.DataFrame(rows)
    for name in columns:
        if name not in frame:
            frame[name] = None
    frame["confidence"] = frame["confidence"].fillna("normal")
    frame["_rank"] = frame["severity"].map(SEVERITY_ORDER)
    frame["_kind"] = frame["kind"].map({kind: i for i, kind in enumerate(KIND_ORDER)}).fillna(len(KIND_ORDER))
    frame = frame.sort_values(["_rank", "_kind"], kind="stable").drop(columns=["_rank", "_kind"])
    return frame[columns].reset_index(drop=True)


def _mark_low_confidence(rows: list[dict], unfaithful: list[dict]) -> None:
    """Map-based findings on a class whose maps are unfaithful (or on every class, when the
    method fails the sanity check) get confidence "low" and the reason in the message."""
    reasons: dict[str | None, str] = {}
    for row in unfaithful:
        reasons[row["class_name"]] = row["reason"]
    for row in rows:
        if row["kind"] not in MAP_BASED:
            continue
        reason = reasons.get(row.get("class_name")) or reasons.get(None)
        if reason:
            row["confidence"] = "low"
            row["message"] += f" Low confidence: {reason}."
    for row in unfaithful:
        row.pop("reason")


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
                severity=severity(lift, 0.5, 1.0, larger_is_worse=False),
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


def judged_sanity_step(details: pd.Series) -> str | None:
    """The cascade step the sanity check is judged on: classifier and explained stage
    randomised (step 2), or the only step there is."""
    steps = sorted(dict.fromkeys(details), key=lambda d: int(str(d).split(":", 1)[0]) if str(d)[:1].isdigit() else 0)
    return steps[min(1, len(steps) - 1)] if steps else None


def unfaithful_explanations(
    occlusion: pd.DataFrame | None,
    metrics: pd.DataFrame | None,
    layer: str | None,
    classes: list[str],
    t: Thresholds,
) -> list[dict]:
    """Grad-CAM that fails the sanity check (every class), or disagrees with occlusion on a class.

    Rows carry a ``reason`` (popped before storage) that marks the map-based findings they undermine.
    """
    rows = []
    if metrics is not None and not metrics.empty:
        sanity = metrics[(metrics["metric"] == "sanity_spearman") & (metrics["method"] == "gradcam")]
        step = judged_sanity_step(sanity["detail"]) if not sanity.empty else None
        if step is not None:
            value = float(sanity.loc[sanity["detail"] == step, "value"].iloc[0])
            if value >= t.sanity_max_spearman:
                reason = (f"Grad-CAM fails the model-randomisation sanity check (rank correlation {value:.2f} with "
                          f"the classifier and explained stage randomised, limit {t.sanity_max_spearman})")
                rows.append(
                    dict(
                        kind="unfaithful_explanation",
                        severity="high",
                        class_name=None,
                        slice=f"step={step}",
                        metric="sanity_spearman",
                        value=value,
                        threshold=t.sanity_max_spearman,
                        message=(
                            f"{reason}: its maps barely change when the model's weights are replaced by random "
                            "ones, so they show the image's edges more than what the model learnt. Findings that "
                            "rest on the maps are marked low confidence; check the explained layer (--layer)."
                        ),
                        evidence=[],
                        reason=reason,
                    )
                )
    if occlusion is None or occlusion.empty or "gradcam_spearman" not in occlusion:
        return rows
    scored = occlusion[occlusion["is_label"] & occlusion["gradcam_spearman"].notna()]
    for name, group in scored.groupby("target", sort=True):
        if len(group) < t.min_class_images:
            continue
        median = float(group["gradcam_spearman"].median())
        if median >= t.faithfulness_min_spearman:
            continue
        reason = (f"for '{name}' Grad-CAM and occlusion disagree (median rank correlation {median:.2f}, "
                  f"below {t.faithfulness_min_spearman})")
        rows.append(
            dict(
                kind="unfaithful_explanation",
                severity=severity(median, 0.0, 0.1, larger_is_worse=False),
                class_name=str(name),
                slice=f"layer={layer}" if layer else None,
                metric="gradcam_occlusion_spearman",
                value=median,
                threshold=t.faithfulness_min_spearman,
                message=(
                    f"On '{name}' images, Grad-CAM's map and the occlusion map (what muting each region costs "
                    f"the class) rank the regions differently: median Spearman {median:.2f} over {len(group)} "
                    "maps. Where they disagree, the Grad-CAM map is not a faithful account of what the model "
                    "uses; trust the occlusion maps for this class, and treat map-based findings on it with care."
                ),
                evidence=group.sort_values("gradcam_spearman")["image_id"].head(t.evidence).tolist(),
                reason=reason,
            )
        )
    return rows
