"""The explanation-methods section: which methods ran, the model-randomisation sanity check,
faithfulness (Grad-CAM against occlusion; deletion and insertion) and the feature views."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.explain.catalogue import method_names, method_title
from visaudit.tasks.explain.feature_index import FEATURES_DIR
from visaudit.tasks.findings.thresholds import Thresholds
from visaudit.tasks.findings.unfaithful_explanation import judged_sanity_step, sanity_steps
from visaudit.tasks.report.examples import Thumb
from visaudit.tasks.report.formatting import file_name, number, optional_float, score

# Grad-CAM paper (Selvaraju et al. 2017, sec. 5.3): rank correlation with occlusion maps,
# image classification on PASCAL VOC 2007 val.
PAPER_FAITHFULNESS = (("Grad-CAM", 0.254), ("Guided Grad-CAM", 0.261), ("Guided Backprop", 0.168))


@dataclass(frozen=True)
class MethodView:
    """A method visaudit knows (display name, stored key), whether this run computed it, and
    why not when it was requested but cannot apply to the model (``note``)."""

    name: str
    key: str
    computed: bool
    note: str = ""


@dataclass(frozen=True)
class ExplainedLayer:
    """The layer the maps explain and the reason it was chosen; ``name`` is "" for a model
    with no layer (TorchScript), whose ``reason`` says so."""

    name: str
    reason: str


@dataclass(frozen=True)
class SanityRow:
    """One method's correlations per cascade step, and its verdict at the judged step."""

    method: str
    cells: list[str]
    passes: bool
    judged: str


@dataclass(frozen=True)
class SanityView:
    """The sanity check's table: its steps (columns), rows, limit and the step judged."""

    steps: list[str]
    rows: list[SanityRow]
    threshold: str
    judged_step: str
    images: int


@dataclass(frozen=True)
class ClassFaithfulness:
    """Mean Grad-CAM/occlusion rank correlation of one class's predicted-class maps."""

    class_name: str
    images: int
    spearman: str


@dataclass(frozen=True)
class AucRow:
    """One method's deletion and insertion AUCs."""

    method: str
    deletion: str
    insertion: str


@dataclass(frozen=True)
class FaithfulnessView:
    """Grad-CAM against occlusion (overall, by class, the paper's figures) and deletion/insertion."""

    overall: str
    images: int
    by_class: list[ClassFaithfulness]
    paper: list[tuple[str, str]]
    window: str | None
    rise: list[AucRow]
    rise_images: int


@dataclass(frozen=True)
class FeatureFilters:
    """The first convolution's filters as one picture."""

    count: int
    layer: str
    path: str


@dataclass(frozen=True)
class FeatureStrip:
    """One image and its most active channels' maps."""

    file_name: str
    thumbs: list[Thumb]


@dataclass(frozen=True)
class FeatureView:
    """The feature views written at audit time."""

    layer: str | None
    filters: FeatureFilters | None
    strips: list[FeatureStrip]


def methods_view(record: RunRecord, stored: list[str]) -> list[MethodView]:
    """Every method visaudit knows, and whether this run computed it (run.json's list, else the
    ``stored`` methods)."""
    asked = set(record.parameters.get("methods") or stored)
    skipped = record.model.skipped
    return [MethodView(method_title(key), key, key in asked, skipped.get(key, "")) for key in method_names()]


def explained_layer(record: RunRecord) -> ExplainedLayer | None:
    """The explained layer (the last hooked one) and its reason, from run.json; a run with no
    layer but a reason (a TorchScript model) gets a nameless one carrying that reason."""
    layers, reason = record.model.layers, record.model.layer_reason
    if not layers:
        return ExplainedLayer("", reason) if reason else None
    return ExplainedLayer(layers[-1], reason)


def ordered_methods(stored: pd.Series) -> list[str]:
    """The known methods among ``stored``, in display order."""
    present = set(stored)
    return [m for m in method_names() if m in present]


def step_title(step: str) -> str:
    """'2:fc+layer4' -> 'fc + layer4'."""
    return step.split(":", 1)[-1].replace("+", " + ")


def sanity_view(metrics: pd.DataFrame, record: RunRecord) -> SanityView | None:
    """The model-randomisation sanity check as a table: one row per method, one column per
    cascade step; a method fails when, at the step the findings judge (classifier and explained
    stage randomised), its maps keep a rank correlation of at least the threshold."""
    rows = metrics[metrics["metric"] == "sanity_spearman"]
    if rows.empty:
        return None
    thresholds = record.parameters.get("thresholds") or {}
    limit = float(thresholds.get("sanity_max_spearman", Thresholds.sanity_max_spearman))
    steps = sanity_steps(rows["detail"])
    judged_step = judged_sanity_step(rows["detail"])
    table = []
    for method in ordered_methods(rows["method"]):
        by_step = rows[rows["method"] == method].set_index("detail")["value"]
        judged = optional_float(by_step.get(judged_step))
        table.append(SanityRow(
            method=method_title(method),
            cells=[score(by_step.get(step)) for step in steps],
            passes=judged is not None and judged < limit,
            judged=score(judged),
        ))
    return SanityView(
        steps=[step_title(step) for step in steps],
        rows=table,
        threshold=number(limit),
        judged_step=step_title(str(judged_step)),
        images=int(rows["images"].max()),
    )


def faithfulness_view(occlusion: pd.DataFrame, metrics: pd.DataFrame) -> FaithfulnessView | None:
    """Grad-CAM against occlusion (Spearman per predicted-class map, by class, beside the
    paper's figures) and RISE deletion/insertion AUCs; None when neither was computed."""
    rows = occlusion[occlusion["is_predicted"] & occlusion["gradcam_spearman"].notna()] if len(occlusion) else occlusion
    rise = metrics[metrics["metric"].isin(["deletion_auc", "insertion_auc"])]
    if not len(rows) and rise.empty:
        return None
    by_class = [
        ClassFaithfulness(name, int(len(group)), score(group["gradcam_spearman"].mean()))
        for name, group in rows.groupby("target", sort=True)
    ]
    auc_rows = []
    for method in ordered_methods(rise["method"]):
        aucs = rise[rise["method"] == method].set_index("metric")["value"]
        auc_rows.append(AucRow(method_title(method), score(aucs.get("deletion_auc")), score(aucs.get("insertion_auc"))))
    first = occlusion.iloc[0] if len(occlusion) else None
    return FaithfulnessView(
        overall=score(rows["gradcam_spearman"].mean()) if len(rows) else "n/a",
        images=int(len(rows)),
        by_class=by_class,
        paper=[(name, f"{value:.3f}") for name, value in PAPER_FAITHFULNESS],
        window=None if first is None else f"{first['window']} px windows, stride {first['stride']}, baseline {first['baseline']}",
        rise=auc_rows,
        rise_images=int(rise["images"].max()) if not rise.empty else 0,
    )


def missing_figures(record: RunRecord, run_dir: Path, folder: str) -> str | None:
    """What to say when the run drew figures into ``folder`` (run.json's ``figures``) and they
    are no longer there: the truth, not "not computed"."""
    made = record.figures.get(folder, 0)
    if not made or (run_dir / folder).is_dir():
        return None
    return (f"Computed in this run ({made} files in {folder}/), but {run_dir / folder} is missing now: the "
            "figures were deleted after the run. Re-rendering cannot draw them again (they need the model); "
            "a new run does.")


def feature_ids(index: dict[str, Any] | None) -> list[str]:
    """The images of the feature views (their rows name them by file)."""
    return [entry["image_id"] for entry in (index or {}).get("images", [])]


def feature_view(index: dict[str, Any] | None, by_id: pd.DataFrame) -> FeatureView | None:
    """The feature views of the run's ``features/features.json`` index (``by_id``: predictions by image id)."""
    if index is None:
        return None
    strips = []
    for entry in index.get("images", []):
        thumbs = [Thumb(f"{FEATURES_DIR}/{entry['image']}", "image")]
        thumbs += [Thumb(f"{FEATURES_DIR}/{c['path']}", f"channel {c['channel']} (mean {c['mean']:.2f})") for c in entry["channels"]]
        image_id = entry["image_id"]
        shown = file_name(str(by_id.loc[image_id, "uri"])) if image_id in by_id.index else image_id
        strips.append(FeatureStrip(shown, thumbs))
    filters = index.get("filters")
    return FeatureView(
        layer=index.get("layer"),
        filters=FeatureFilters(filters["count"], filters["layer"], f"{FEATURES_DIR}/{filters['path']}") if filters else None,
        strips=strips,
    )
