"""``unfaithful_explanation``: Grad-CAM maps that do not explain the model.

Two checks, each with its own input: Grad-CAM fails the model-randomisation sanity check
(``metrics`` rows ``sanity_spearman``: its maps keep a rank correlation of at least
``sanity_max_spearman`` on the judged cascade step, see :func:`judged_sanity_step`), which
undermines the maps of every class; or, on a class, Grad-CAM and occlusion disagree
(``occlusion.gradcam_spearman``, median below ``faithfulness_min_spearman``), which
undermines that class's maps. Map-based findings there get confidence "low".
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.thresholds import Thresholds, severity


def _step_number(detail: str) -> int:
    """The cascade step of a sanity ``detail`` ("2:fc+layer4" -> 2; 0 without a number)."""
    head = detail.split(":", 1)[0]
    return int(head) if head.isdigit() else 0


def sanity_steps(details: Iterable[object]) -> list[str]:
    """The distinct cascade steps among the sanity rows' ``detail`` cells ("<step>:<randomised
    modules>"), in step order (classifier first, then the stages from the deepest down)."""
    return sorted(dict.fromkeys(str(d) for d in details), key=_step_number)


def judged_sanity_step(details: Iterable[object]) -> str | None:
    """The cascade step the sanity check is judged on: the second of :func:`sanity_steps`
    (step 2: the classifier and the explained stage randomised), or the only step there
    is; None without steps. A method fails when its maps keep a rank correlation of at
    least ``Thresholds.sanity_max_spearman`` at this step."""
    steps = sanity_steps(details)
    return steps[min(1, len(steps) - 1)] if steps else None


def failed_sanity_check(metrics: pd.DataFrame, t: Thresholds) -> list[Finding]:
    """A high finding when Grad-CAM fails the sanity check on the judged step (every class's maps)."""
    sanity = metrics[(metrics["metric"] == "sanity_spearman") & (metrics["method"] == "gradcam")]
    step = judged_sanity_step(sanity["detail"])
    if step is None:
        return []
    value = float(sanity.loc[sanity["detail"] == step, "value"].iloc[0])
    if value < t.sanity_max_spearman:
        return []
    reason = (f"Grad-CAM fails the model-randomisation sanity check (rank correlation {value:.2f} with "
              f"the classifier and explained stage randomised, limit {t.sanity_max_spearman})")
    return [Finding(
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
        undermines_maps=reason,
    )]


def occlusion_disagreement(occlusion: pd.DataFrame, layer: str | None, t: Thresholds) -> list[Finding]:
    """One finding per class whose Grad-CAM and occlusion maps rank the regions differently;
    evidence the least correlated images first."""
    if "gradcam_spearman" not in occlusion:
        return []
    scored = occlusion[occlusion["is_label"] & occlusion["gradcam_spearman"].notna()]
    found = []
    for name, group in scored.groupby("target", sort=True):
        if len(group) < t.min_class_images:
            continue
        median = float(group["gradcam_spearman"].median())
        if median >= t.faithfulness_min_spearman:
            continue
        reason = (f"for '{name}' Grad-CAM and occlusion disagree (median rank correlation {median:.2f}, "
                  f"below {t.faithfulness_min_spearman})")
        found.append(Finding(
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
            evidence=tuple(group.sort_values("gradcam_spearman")["image_id"].head(t.evidence)),
            undermines_maps=reason,
        ))
    return found


def unfaithful_explanations(
    metrics: pd.DataFrame | None, occlusion: pd.DataFrame | None, layer: str | None, t: Thresholds
) -> list[Finding]:
    """The sanity-check finding (with ``metrics``), then the per-class occlusion ones (with ``occlusion``)."""
    found = failed_sanity_check(metrics, t) if metrics is not None and not metrics.empty else []
    if occlusion is not None and not occlusion.empty:
        found += occlusion_disagreement(occlusion, layer, t)
    return found


DETECTOR = Detector(
    kind="unfaithful_explanation",
    detect=lambda tables, t: unfaithful_explanations(tables.metrics, tables.occlusion, tables.layer, t),
)
