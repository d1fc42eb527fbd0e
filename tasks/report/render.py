"""Report: a committed run's tables and run.json -> Jinja2 HTML -> WeasyPrint PDF.

The report reads nothing but the committed tables and ``runs/<run_id>/run.json``, so
``visaudit report RUN`` can re-render it at any time. Figures are small PNG files under
``runs/<run_id>/images/``, referenced by relative paths, shared by the HTML (which works
offline) and the PDF. Overlays are drawn only for the images the report shows: the
evidence of each finding and the failure gallery, never the whole table.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from matplotlib.figure import Figure
from PIL import Image
from visaudit.tasks.audit.shard import label_matrix
from visaudit.tasks.data.images import Decoded, Preprocess, boxes_to_input, decode_many
from visaudit.tasks.data.sources import attribute_pairs
from visaudit.tasks.data.storage import read_table
from visaudit.tasks.explain.overlay import overlay_pixels, saliency_pixels, save_photo
from visaudit.tasks.findings.calibration import reliability_of
from visaudit.tasks.findings.shortcuts import wilson_interval
from weasyprint import HTML, URLFetcher

DEFAULT_TEMPLATES: Path = Path(str(files("visaudit.templates")))  # shipped as package data
TEMPLATE_NAME = "report.html.j2"
STYLESHEET_NAME = "report.css"
IMAGES_DIR = "images"
SEVERITIES = ("high", "medium", "low")
PREFERRED_METHOD = "gradcam"
# Display order and names of the stored methods; guided maps live at the input ("input" layer).
METHOD_NAMES = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "cam": "CAM",
    "counterfactual": "Counterfactual",
    "occlusion": "Occlusion",
    "guided_backprop": "Guided Backprop",
    "guided_gradcam": "Guided Grad-CAM",
    "impressions": "Class impressions",
}
INPUT_LAYER = "input"
GUIDED = ("guided_backprop", "guided_gradcam")
OCCLUSION_LAYER = "occlusion grid"
# Grad-CAM paper (Selvaraju et al. 2017, sec. 5.3): rank correlation with occlusion maps,
# image classification on PASCAL VOC 2007 val.
PAPER_FAITHFULNESS = (("Grad-CAM", 0.254), ("Guided Grad-CAM", 0.261), ("Guided Backprop", 0.168))
LAYER_STRIP_EXAMPLES = 4
IMPRESSION_EXAMPLES = 3  # real images shown beside each class impression
SAME_SPOT_RADIUS = 0.2  # a real image's Grad-CAM peak this close to the impression's evidence counts as the same spot
SAME_SPOT_SHARE = 0.5  # ... and this share of the class's images peaking there makes it a fixed position
COLOUR_SWATCH_PX = 32  # side of the colour impression's swatch figure
COLOUR_SHORTCUT = 0.9  # a plain colour alone given a class with this probability is noted as a colour cue
NEARER_BORDERS = 0.75  # ... and a background one when the class's borders' median distance to it is this share of the others'
MAX_UNREADABLE_ROWS = 50
MAX_MATRIX_CLASSES = 25  # a bigger confusion matrix shows the classes with the most errors
OVERVIEW_FINDINGS = 10  # findings listed on the cover page
BOX_COLUMNS = ["box_x0", "box_y0", "box_x1", "box_y1"]


@dataclass(frozen=True)
class ReportPaths:
    """Where the report was written (``pdf`` is None when no PDF was asked for)."""

    html: Path
    pdf: Path | None


@dataclass(frozen=True)
class Thumb:
    """One picture slot of an example: a PNG path relative to the run folder, or None (unavailable)."""

    src: str | None
    caption: str


@dataclass(frozen=True)
class Example:
    """One image shown in the report, with its thumbnails and what the model said about it."""

    image_id: str
    file_name: str
    labels: list[str]
    predicted: list[str]
    confidence: float | None
    top: list[tuple[str, float]]
    attributes: list[tuple[str, str]]
    thumbs: list[Thumb]


def render_report(
    out_dir: Path,
    run_id: str,
    template_dir: Path | None = None,
    *,
    pdf: bool = True,
    gallery_size: int = 12,
    evidence_per_finding: int = 4,
) -> ReportPaths:
    """Render runs/<run_id>/report.html (+ report.pdf) from the committed tables and run.json alone."""
    out_dir = Path(out_dir)
    run_dir = out_dir / "runs" / run_id
    record = load_record(run_dir)
    env = environment(template_dir)
    context, painter = report_context(out_dir, run_id, record, gallery_size, evidence_per_finding)
    html = env.get_template(TEMPLATE_NAME).render(**context, stylesheet=stylesheet(env))
    html_path = run_dir / "report.html"
    write_atomically(html_path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    pdf_path = run_dir / "report.pdf" if pdf else None
    if pdf_path is not None:
        write_atomically(pdf_path, lambda tmp: write_pdf(html_path, run_dir, tmp))
    painter.prune()
    return ReportPaths(html_path, pdf_path)


def report_context(
    out_dir: Path, run_id: str, record: Mapping[str, Any], gallery_size: int, evidence_per_finding: int
) -> tuple[dict[str, Any], Painter]:
    """Everything the template shows; figures are drawn for the shown images only."""
    predictions = read_table(out_dir, "predictions", run_id)
    findings = sort_findings(read_table(out_dir, "findings", run_id))
    model = record.get("model") or {}
    multilabel = model.get("task") == "multilabel"
    classes = list(record.get("classes") or _classes_seen(predictions))
    evidence = [_ids(cell)[:evidence_per_finding] for cell in findings["evidence"]]
    failures = failure_gallery(predictions, gallery_size)
    impressions = read_table(out_dir, "impressions", run_id)
    class_examples = impression_examples(predictions, impressions["class_name"], IMPRESSION_EXAMPLES)
    shown = {image_id for ids in evidence for image_id in ids} | set(failures["image_id"])
    shown |= {image_id for ids in class_examples.values() for image_id in ids}
    explanations = read_table(out_dir, "explanations", run_id)
    peaks = label_peaks(explanations)
    explanations = explanations[explanations["image_id"].isin(shown)]
    occlusion = read_table(out_dir, "occlusion", run_id)
    if len(occlusion):
        shown_occlusion = occlusion[occlusion["image_id"].isin(shown)].assign(method="occlusion", layer=OCCLUSION_LAYER)
        explanations = pd.concat(
            [explanations, shown_occlusion[["image_id", "method", "layer", "target", "height", "width", "heatmap"]]],
            ignore_index=True,
        )
    painter = Painter(out_dir / "runs" / run_id, preprocess_of(record), explanations, list(model.get("layers") or []))
    painter.decode(predictions[predictions["image_id"].isin(shown)])
    by_id = predictions.set_index("image_id", drop=False)
    context = {
        "run": run_summary(record, run_id),
        "metrics": headline_metrics(predictions, classes, multilabel),
        "verdict": verdict(findings),
        "findings": [
            finding_view(row, [by_id.loc[i] for i in ids if i in by_id.index], painter)
            for (_, row), ids in zip(findings.iterrows(), evidence)
        ],
        "overview_limit": OVERVIEW_FINDINGS,
        "multilabel": multilabel,
        "class_rows": class_table(predictions, classes, multilabel),
        "confusion": None if multilabel else confusion_figure(predictions, classes, painter),
        "gallery": [gallery_example(row, painter, multilabel) for _, row in failures.iterrows()],
        "layer_strips": layer_strips(
            [by_id.loc[i] for i in dict.fromkeys([*(i for ids in evidence for i in ids), *failures["image_id"]])
             if i in by_id.index],
            painter,
        ),
        "methods": methods_view(record, painter),
        "sanity": sanity_view(read_table(out_dir, "metrics", run_id), record),
        "features": feature_view(out_dir / "runs" / run_id, by_id),
        "impressions": impressions_view(impressions, class_examples, by_id, painter, peaks,
                                        image_borders(out_dir, run_id, predictions, impressions)),
        "faithfulness": faithfulness_view(occlusion, read_table(out_dir, "metrics", run_id)),
        "unreadable": unreadable_rows(predictions),
        "calibration": None if multilabel else reliability_figure(predictions, painter),
        "slices": slice_rows(predictions),
        "trends": trends_view(out_dir, run_id, painter),
        "appendix": appendix(record),
    }
    return context, painter


# --- inputs -----------------------------------------------------------------------------


def load_record(run_dir: Path) -> dict[str, Any]:
    """The run's run.json; a clear error when the run was never committed."""
    path = run_dir / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no run.json; is the run id right and did the run finish?")
    return json.loads(path.read_text(encoding="utf-8"))


def preprocess_of(record: Mapping[str, Any]) -> Preprocess:
    """The run's preprocessing, so overlays line up with the maps the model produced."""
    values = record.get("preprocess") or {}
    defaults = Preprocess()
    return Preprocess(
        resize=int(values.get("resize", defaults.resize)),
        crop=int(values.get("crop", defaults.crop)),
        mean=tuple(values.get("mean", defaults.mean)),
        std=tuple(values.get("std", defaults.std)),
    )


def _ids(values: Any) -> list[str]:
    """A list cell (numpy array, list or null) as a list of strings."""
    if values is None or (isinstance(values, float) and math.isnan(values)):
        return []
    return [str(v) for v in values]


def _classes_seen(predictions: pd.DataFrame) -> list[str]:
    """Class names from the tables, for a run.json without a class list."""
    names = {name for column in ("labels", "predicted") for cell in predictions[column] for name in _ids(cell)}
    return sorted(names)


def _string(value: Any) -> str | None:
    """A string cell, or None for null/NaN."""
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    """A float, or None for null/NaN."""
    if value is None or value is pd.NA:
        return None
    number = float(value)
    return None if math.isnan(number) else number


# --- header and findings ------------------------------------------------------------------


def run_summary(record: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """The cover's identity lines: model, data, run id, date."""
    model, data = record.get("model") or {}, record.get("data") or {}
    return {
        "run_id": record.get("run_id", run_id),
        "model": model.get("name") or "unnamed model",
        "source": data.get("source") or "unknown source",
        "task": model.get("task") or "multiclass",
        "date": format_date(record.get("finished") or record.get("started")),
    }


def format_date(value: str | None) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM UTC' (or as given when it does not parse)."""
    if not value:
        return "unknown date"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    zone = moment.tzname() or ""
    return f"{moment:%Y-%m-%d %H:%M} {'UTC' if zone in ('UTC', 'UTC+00:00') else zone}".strip()


def headline_metrics(predictions: pd.DataFrame, classes: list[str], multilabel: bool) -> list[tuple[str, str]]:
    """Key numbers, computed from the tables (the tables are the truth, run.json may be older)."""
    audited = predictions[predictions["error"].isna()]
    judged = audited[audited["correct"].notna()]
    accuracy = judged["correct"].astype(bool).mean() if len(judged) else None
    top5 = None
    if not multilabel and len(judged):
        top5 = np.mean([_ids(labels)[0] in _ids(top) for labels, top in zip(judged["labels"], judged["top_classes"])])
    ece = None
    if not multilabel and len(judged):
        ece = reliability_of(judged).ece
    spread = "n/a"
    if not multilabel and len(judged):
        per_class = judged.groupby(judged["labels"].map(lambda v: _ids(v)[0]))["correct"].agg(
            lambda c: c.astype(bool).mean()
        )
        spread = f"{percent(per_class.min())} to {percent(per_class.max())}"
    return [
        ("Images", f"{len(predictions):,}"),
        ("Audited", f"{len(audited):,}"),
        ("Unreadable", f"{len(predictions) - len(audited):,}"),
        ("Exact-match accuracy" if multilabel else "Accuracy", percent(accuracy)),
        ("Top-5 accuracy", percent(top5)),
        ("Per-class accuracy", spread),
        ("Calibration error (ECE)", percent(ece)),
        ("Classes", f"{len(classes):,}"),
    ]


def percent(value: float | None) -> str:
    """0.934 -> '93.4%'; None -> 'n/a'."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.1%}"


def number(value: Any) -> str:
    """A metric value or threshold, short (3 significant digits); 'n/a' when missing."""
    parsed = _number(value)
    return "n/a" if parsed is None else f"{parsed:.3g}"


def score(value: Any) -> str:
    """A model score with two decimals; 'n/a' when missing."""
    parsed = _number(value)
    return "n/a" if parsed is None else f"{parsed:.2f}"


def sort_findings(findings: pd.DataFrame) -> pd.DataFrame:
    """Most severe first (high, medium, low, anything else), keeping the table's order within a level."""
    rank = findings["severity"].map({s: i for i, s in enumerate(SEVERITIES)}).fillna(len(SEVERITIES))
    return findings.assign(_rank=rank).sort_values("_rank", kind="stable").drop(columns="_rank").reset_index(drop=True)


def verdict(findings: pd.DataFrame) -> str:
    """'3 findings: 1 high, 2 medium' or 'No findings'."""
    if findings.empty:
        return "No findings"
    counts = findings["severity"].value_counts()
    levels = [s for s in SEVERITIES if s in counts] + sorted(set(counts.index) - set(SEVERITIES))
    noun = "finding" if len(findings) == 1 else "findings"
    return f"{len(findings)} {noun}: " + ", ".join(f"{counts[s]} {s}" for s in levels)


def finding_view(finding: pd.Series, evidence: list[pd.Series], painter: Painter) -> dict[str, Any]:
    """One finding block: badge, message, measured number, and its evidence examples."""
    class_name, slice_text = _string(finding.get("class_name")), _string(finding.get("slice"))
    layer = _slice_value(slice_text, "layer")
    return {
        "kind": finding["kind"],
        "severity": finding["severity"],
        "class_name": class_name,
        "slice": slice_text,
        "low_confidence": _string(finding.get("confidence")) == "low",
        "message": finding["message"],
        "measure": f"{finding['metric']} = {number(finding['value'])} (threshold {number(finding['threshold'])})",
        "examples": [evidence_example(row, class_name, painter, layer) for row in evidence],
    }


def _slice_value(slice_text: str | None, key: str) -> str | None:
    """The value of ``key`` in a slice string such as 'layer=layer4'."""
    for part in (slice_text or "").split(","):
        name, _, value = part.partition("=")
        if name.strip() == key and value:
            return value.strip()
    return None


def evidence_example(row: pd.Series, class_name: str | None, painter: Painter, layer: str | None) -> Example:
    """An evidence image and every stored method's map for the TRUE label (the finding's class
    first), else the prediction: Grad-CAM at the finding's layer, the others beside it."""
    labels, predicted = _ids(row["labels"]), _ids(row["predicted"])
    preferred = [class_name] if class_name in labels else []
    targets = preferred + labels + predicted
    target = next((t for t in targets if painter.find_map(row["image_id"], t, layer) is not None), None)
    if target is None:
        return make_example(row, painter, [])
    image_id = str(row["image_id"])
    thumbs = [Thumb(painter.image(image_id), "image")]
    for method in painter.methods:
        at = layer if method == painter.method else None
        if painter.find_map(image_id, target, at, method) is not None:
            thumbs.append(Thumb(painter.overlay(image_id, target, at, method), f"{method_name(method)}: {target}"))
    return make_example(row, painter, [], thumbs=thumbs)


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def layer_strips(rows: list[pd.Series], painter: Painter) -> list[Example]:
    """Grad-CAM of the predicted class at every stored stage, shallow to deep, for a few images."""
    if len(painter.layers) < 2:
        return []
    strips = []
    for row in rows[:LAYER_STRIP_EXAMPLES]:
        image_id = str(row["image_id"])
        target = next((t for t in _ids(row["predicted"]) if painter.find_map(image_id, t) is not None), None)
        if target is None:
            continue
        thumbs = [Thumb(painter.image(image_id), "image")]
        thumbs += [
            Thumb(painter.overlay(image_id, target, layer), f"{layer}: {target}")
            for layer in painter.layers
            if painter.find_map(image_id, target, layer) is not None
        ]
        strips.append(make_example(row, painter, [], thumbs=thumbs))
    return strips


def methods_view(record: Mapping[str, Any], painter: Painter) -> list[dict[str, Any]]:
    """Every method visaudit knows, and whether this run computed it."""
    asked = set((record.get("parameters") or {}).get("methods") or painter.methods)
    return [{"name": name, "key": key, "computed": key in asked} for key, name in METHOD_NAMES.items()]


def sanity_view(metrics: pd.DataFrame, record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model-randomisation sanity check as a table: one row per method, one column per
    cascade step; a method fails when, with the classifier and the explained stage
    randomised (step 2), its maps keep a rank correlation of at least the threshold."""
    rows = metrics[metrics["metric"] == "sanity_spearman"]
    if rows.empty:
        return None
    thresholds = (record.get("parameters") or {}).get("thresholds") or {}
    limit = float(thresholds.get("sanity_max_spearman", 0.5))
    steps = list(dict.fromkeys(rows["detail"]))
    judged_step = steps[min(1, len(steps) - 1)]
    table = []
    for method in [m for m in METHOD_NAMES if m in set(rows["method"])]:
        values = rows[rows["method"] == method].set_index("detail")["value"]
        judged = _number(values.get(judged_step))
        table.append({
            "method": method_name(method),
            "cells": [score(values.get(step)) for step in steps],
            "passes": judged is not None and judged < limit,
            "judged": score(judged),
        })
    return {
        "steps": [step.split(":", 1)[-1].replace("+", " + ") for step in steps],
        "rows": table,
        "threshold": number(limit),
        "judged_step": judged_step.split(":", 1)[-1].replace("+", " + "),
        "images": int(rows["images"].max()),
    }


def faithfulness_view(occlusion: pd.DataFrame, metrics: pd.DataFrame) -> dict[str, Any] | None:
    """Grad-CAM against occlusion (Spearman per predicted-class map, by class, beside the
    paper's figures) and RISE deletion/insertion AUCs; None when occlusion was not computed."""
    rows = occlusion[occlusion["is_predicted"] & occlusion["gradcam_spearman"].notna()] if len(occlusion) else occlusion
    rise = metrics[metrics["metric"].isin(["deletion_auc", "insertion_auc"])]
    if not len(rows) and rise.empty:
        return None
    by_class = [
        {"class_name": name, "images": int(len(group)), "spearman": score(group["gradcam_spearman"].mean())}
        for name, group in rows.groupby("target", sort=True)
    ]
    auc_rows = []
    for method in [m for m in METHOD_NAMES if m in set(rise["method"])]:
        values = rise[rise["method"] == method].set_index("metric")["value"]
        auc_rows.append({"method": method_name(method), "deletion": score(values.get("deletion_auc")),
                         "insertion": score(values.get("insertion_auc"))})
    first = occlusion.iloc[0] if len(occlusion) else None
    return {
        "overall": score(rows["gradcam_spearman"].mean()) if len(rows) else "n/a",
        "images": int(len(rows)),
        "by_class": by_class,
        "paper": [(name, f"{value:.3f}") for name, value in PAPER_FAITHFULNESS],
        "window": None if first is None else f"{first['window']} px windows, stride {first['stride']}, baseline {first['baseline']}",
        "rise": auc_rows,
        "rise_images": int(rise["images"].max()) if not rise.empty else 0,
    }


def feature_view(run_dir: Path, by_id: pd.DataFrame) -> dict[str, Any] | None:
    """The feature views written at audit time (``features/features.json``), if any."""
    path = run_dir / "features" / "features.json"
    if not path.is_file():
        return None
    index = json.loads(path.read_text())
    strips = []
    for entry in index.get("images", []):
        thumbs = [Thumb(f"features/{entry['image']}", "image")]
        thumbs += [Thumb(f"features/{c['path']}", f"channel {c['channel']} (mean {c['mean']:.2f})") for c in entry["channels"]]
        strips.append({"file_name": file_name(str(by_id.loc[entry["image_id"], "uri"])) if entry["image_id"] in by_id.index
                       else entry["image_id"], "thumbs": thumbs})
    filters = index.get("filters")
    return {
        "layer": index.get("layer"),
        "filters": {**filters, "path": f"features/{filters['path']}"} if filters else None,
        "strips": strips,
    }


# --- class impressions ----------------------------------------------------------------------


def impression_examples(predictions: pd.DataFrame, class_names: Iterable[str], count: int) -> dict[str, list[str]]:
    """Per impression class, up to ``count`` real images labelled with it: correct ones first,
    most confident first."""
    readable = predictions[predictions["error"].isna()].explode("labels")
    readable = readable.assign(right=readable["correct"].eq(True).fillna(False).astype(bool)).sort_values(
        ["right", "confidence"], ascending=False, kind="stable"
    )
    grouped = readable.groupby("labels", sort=False)["image_id"]
    return {name: grouped.get_group(name).head(count).tolist() if name in grouped.groups else []
            for name in class_names}


def label_peaks(explanations: pd.DataFrame) -> pd.DataFrame:
    """Grad-CAM peaks of every image's map for its own label(s): where real images' evidence sits."""
    own = explanations[(explanations["method"] == PREFERRED_METHOD) & explanations["is_label"]]
    return own[["layer", "target", "peak_x", "peak_y"]]


def position_words(x: float, y: float) -> str:
    """Where a point (0..1 of width and height) lies, in words: "top-left", "centre", ..."""
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else "middle"
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "centre"
    if vertical == "middle":
        return "centre" if horizontal == "centre" else horizontal
    return vertical if horizontal == "centre" else f"{vertical}-{horizontal}"


def impression_note(row: Any, peaks: pd.DataFrame) -> str | None:
    """Says where an impression's evidence sits when that is off-centre, and whether the class's
    real images peak on the same spot (a fixed-position cue), with the numbers."""
    if not bool(row.off_centre) or _number(row.centroid_x) is None:
        return None
    x, y = float(row.centroid_x), float(row.centroid_y)
    note = f"Its evidence sits off-centre, at the {position_words(x, y)} (x {x:.2f}, y {y:.2f})."
    own = peaks[(peaks["target"] == row.class_name) & (peaks["layer"] == row.layer)].dropna(subset=["peak_x", "peak_y"])
    if len(own):
        share = float((np.hypot(own["peak_x"] - x, own["peak_y"] - y) <= SAME_SPOT_RADIUS).mean())
        note += f" {share:.0%} of the {len(own)} real images of the class peak within {SAME_SPOT_RADIUS} of that spot"
        note += ": a fixed-position cue the model relies on." if share >= SAME_SPOT_SHARE else "."
    return note


def image_borders(out_dir: Path, run_id: str, predictions: pd.DataFrame, impressions: pd.DataFrame) -> pd.DataFrame:
    """Each readable image's labels and border colour (from ``signals``), read only when a colour
    impression is noted."""
    if "colour_probability" not in impressions or not (impressions["colour_probability"] >= COLOUR_SHORTCUT).any():
        return pd.DataFrame(columns=["labels", "border_r", "border_g", "border_b"])
    borders = read_table(out_dir, "signals", run_id, columns=["image_id", "border_r", "border_g", "border_b"])
    labelled = predictions[predictions["error"].isna()][["image_id", "labels"]]
    return labelled.merge(borders.drop(columns="run_id"), on="image_id").dropna(subset=["border_r"])


def colour_note(row: Any, borders: pd.DataFrame) -> str | None:
    """Says when a plain colour alone makes the model call the class (a colour or background cue),
    and whether the class's real images have borders nearer that colour than the other images do
    (median RGB distance at most ``NEARER_BORDERS`` times theirs; ``borders``: ``labels`` and
    ``border_r/g/b`` in 0..1 per image)."""
    probability = _number(getattr(row, "colour_probability", None))
    if probability is None or probability < COLOUR_SHORTCUT:
        return None
    rgb = np.array([row.colour_r, row.colour_g, row.colour_b], dtype=np.float64)
    note = (f"A plain image of one colour (RGB {int(rgb[0])}, {int(rgb[1])}, {int(rgb[2])}), with no object at all, "
            f"is called {row.class_name} with probability {probability:.2f}: the model takes that colour as evidence "
            "for the class.")
    if len(borders):
        distance = np.linalg.norm(borders[["border_r", "border_g", "border_b"]].to_numpy(np.float64) * 255 - rgb, axis=1)
        own = borders["labels"].map(lambda labels: row.class_name in _ids(labels)).to_numpy(bool)
        if own.any() and (~own).any():
            near, far = float(np.median(distance[own])), float(np.median(distance[~own]))
            note += (f" The class's {int(own.sum())} images have borders nearer that colour than the other "
                     f"{int((~own).sum())} (median RGB distance {near:.0f} against {far:.0f}): a background shortcut in the data."
                     if near <= NEARER_BORDERS * far else
                     f" The class's images' borders are not clearly nearer that colour than the others' (median RGB "
                     f"distance {near:.0f} against {far:.0f}): a colour cue, not the background.")
    return note


def impressions_view(impressions: pd.DataFrame, examples: Mapping[str, list[str]], by_id: pd.DataFrame,
                     painter: Painter, peaks: pd.DataFrame, borders: pd.DataFrame) -> dict[str, Any] | None:
    """Each class impression beside its Grad-CAM, its colour impression and a few real images of
    the class; None when impressions were not computed. ``borders``: image borders' colours with labels."""
    if impressions.empty:
        return None
    rows = []
    for row in impressions.sort_values("class_index", kind="stable").itertuples(index=False):
        path = painter.run_dir / row.image_path
        thumbs = [Thumb(row.image_path if path.is_file() else None, "impression")]
        if path.is_file():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            heat = np.asarray(row.heatmap, dtype=np.float32).reshape(row.height, row.width)
            thumbs.append(Thumb(painter.save(
                f"impression-{digest(row.image_path)}.jpg",
                lambda tmp, heat=heat, pixels=pixels: save_photo(overlay_pixels(heat, pixels, pixels.shape[0], None), tmp),
            ), "Grad-CAM"))
        if _number(getattr(row, "colour_probability", None)) is not None:
            rgb = np.array([row.colour_r, row.colour_g, row.colour_b], dtype=np.uint8)
            thumbs.append(Thumb(painter.save(
                f"colour-{rgb[0]:03d}-{rgb[1]:03d}-{rgb[2]:03d}.jpg",
                lambda tmp, rgb=rgb: save_photo(np.broadcast_to(rgb, (COLOUR_SWATCH_PX, COLOUR_SWATCH_PX, 3)).copy(), tmp),
            ), f"colour alone: {score(row.colour_probability)}"))
        for image_id in examples.get(row.class_name, []):
            if image_id in by_id.index:
                thumbs.append(Thumb(painter.image(image_id), file_name(str(by_id.loc[image_id, "uri"]))))
        rows.append({
            "class_name": row.class_name,
            "probability": score(row.probability),
            "start_probability": score(row.start_probability),
            "competitor": f"{row.competitor_name} {score(row.competitor_probability)}" if row.competitor_index >= 0 else None,
            "thumbs": thumbs,
            "note": " ".join(note for note in (impression_note(row, peaks), colour_note(row, borders)) if note) or None,
        })
    first = impressions.iloc[0]
    objective = json.loads(first["parameters"]).get("objective", "logit")  # runs before the option ascended the logit
    return {"rows": rows, "iterations": int(first["iterations"]), "seed": int(first["seed"]), "layer": first["layer"],
            "objective": objective}


# --- gallery ------------------------------------------------------------------------------


def failure_gallery(predictions: pd.DataFrame, size: int) -> pd.DataFrame:
    """Wrong predictions, most confident first."""
    wrong = predictions[predictions["error"].isna() & predictions["correct"].eq(False).fillna(False).astype(bool)]
    return wrong.sort_values("confidence", ascending=False, kind="stable").head(max(0, size))


def gallery_example(row: pd.Series, painter: Painter, multilabel: bool) -> Example:
    """A failure: the image, the map of the (wrongly) predicted class, and that of the true class."""
    labels, predicted = _ids(row["labels"]), _ids(row["predicted"])
    if multilabel:
        wrong_prediction = next((p for p in predicted if p not in labels), predicted[0] if predicted else None)
        missed_label = next((t for t in labels if t not in predicted), labels[0] if labels else None)
    else:
        wrong_prediction = predicted[0] if predicted else None
        missed_label = labels[0] if len(labels) == 1 else None
    maps = [("predicted", wrong_prediction), ("true", missed_label)]
    stored = [(role, t) for role, t in maps if t and painter.find_map(row["image_id"], t) is not None]
    return make_example(row, painter, stored)


def make_example(
    row: pd.Series, painter: Painter, maps: list[tuple[str, str]], layer: str | None = None,
    thumbs: list[Thumb] | None = None,
) -> Example:
    """The image thumbnail plus one overlay per (role, target class), unless ``thumbs`` are given."""
    image_id = str(row["image_id"])
    if thumbs is None:
        thumbs = [Thumb(painter.image(image_id), "image")]
        thumbs += [Thumb(painter.overlay(image_id, target, layer), f"{role}: {target}") for role, target in maps]
    top = list(zip(_ids(row["top_classes"]), [float(s) for s in _values(row["top_scores"])]))
    return Example(
        image_id=image_id,
        file_name=file_name(str(row["uri"])),
        labels=_ids(row["labels"]),
        predicted=_ids(row["predicted"]),
        confidence=_number(row["confidence"]),
        top=top,
        attributes=[(str(k), str(v)) for k, v in attribute_pairs(row["attributes"])],
        thumbs=thumbs,
    )


def _values(cell: Any) -> list[Any]:
    return [] if cell is None or (isinstance(cell, float) and math.isnan(cell)) else list(cell)


def file_name(uri: str) -> str:
    """The last path segment of a local path or URL."""
    return uri.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or uri


# --- thumbnails and overlays ------------------------------------------------------------


class Painter:
    """Draws the thumbnails and overlays of the shown images, once each, as PNG files.

    It knows only the explanation rows of the shown images, so nothing is drawn for the
    rest of the table; files of earlier renders that are no longer shown are pruned.
    """

    def __init__(self, run_dir: Path, pre: Preprocess, explanations: pd.DataFrame, layers: list[str]) -> None:
        self.run_dir = run_dir
        self.pre = pre
        stored_methods = set(explanations["method"])
        self.method = PREFERRED_METHOD if PREFERRED_METHOD in stored_methods or not stored_methods else sorted(stored_methods)[0]
        self.methods = [m for m in METHOD_NAMES if m in stored_methods] + sorted(stored_methods - set(METHOD_NAMES))
        rows = explanations[explanations["method"] == self.method]
        stored = set(rows["layer"])
        self.layers = [layer for layer in layers if layer in stored]
        self.default_layer = self.layers[-1] if self.layers else (rows["layer"].mode().iloc[0] if len(rows) else "")
        self.maps: dict[tuple[str, str, str, str], Any] = {
            (r.image_id, r.method, r.layer, r.target): r for r in explanations.itertuples(index=False)
        }
        self.decoded: dict[str, Decoded | None] = {}
        self.boxes: dict[str, np.ndarray] = {}
        self.written: set[str] = set()
        (run_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)

    def decode(self, rows: pd.DataFrame) -> None:
        """Re-read the shown images in parallel; one that cannot be read is remembered as None."""
        readable = rows[rows["error"].isna()].drop_duplicates("image_id")
        results = decode_many(readable["uri"].tolist(), self.pre)
        boxes = readable[BOX_COLUMNS].to_numpy(dtype=np.float64)
        for image_id, result, box in zip(readable["image_id"], results, boxes):
            decoded = result if isinstance(result, Decoded) else None
            self.decoded[image_id] = decoded
            if decoded is not None and not np.isnan(box).any():
                self.boxes[image_id] = boxes_to_input(box[None, :], [decoded])[0]

    def find_map(self, image_id: str, target: str, layer: str | None = None, method: str | None = None) -> Any:
        """The stored map row of ``target`` for this image at ``layer`` (else the default layer),
        by ``method`` (default Grad-CAM; guided methods are found at the input), or None."""
        method = method or self.method
        if method in GUIDED:
            return self.maps.get((image_id, method, INPUT_LAYER, target))
        if method == "occlusion":
            return self.maps.get((image_id, method, OCCLUSION_LAYER, target))
        return self.maps.get((image_id, method, layer or self.default_layer, target)) or self.maps.get(
            (image_id, method, self.default_layer, target)
        )

    def image(self, image_id: str) -> str | None:
        """The model-input thumbnail, or None when the image cannot be re-read."""
        decoded = self.decoded.get(image_id)
        if decoded is None:
            return None
        return self.save(f"{digest(image_id)}.jpg", lambda tmp: save_photo(decoded.pixels, tmp))

    def overlay(self, image_id: str, target: str, layer: str | None = None, method: str | None = None) -> str | None:
        """The map of ``target`` over the image (the bare map when the image cannot be re-read);
        guided maps, fine-grained, are drawn on their own in a dark-to-bright colour map."""
        method = method or self.method
        row = self.find_map(image_id, target, layer, method)
        if row is None:
            return None
        decoded = self.decoded.get(image_id)
        pixels = decoded.pixels if decoded is not None else None
        heat = np.asarray(row.heatmap, dtype=np.float32).reshape(row.height, row.width)
        size = pixels.shape[0] if pixels is not None else self.pre.crop
        box = self.boxes.get(image_id)
        name = f"{digest(image_id)}-{digest(f'{method}/{row.layer}/{target}')[:8]}.jpg"
        if method in GUIDED:
            return self.save(name, lambda tmp: save_photo(saliency_pixels(heat, size), tmp))
        return self.save(name, lambda tmp: save_photo(overlay_pixels(heat, pixels, size, box), tmp))

    def save(self, name: str, write: Callable[[Path], None]) -> str:
        """Write figure ``name`` once per render; returns its path relative to the run folder."""
        if name not in self.written:
            write_atomically(self.run_dir / IMAGES_DIR / name, write)
            self.written.add(name)
        return f"{IMAGES_DIR}/{name}"

    def prune(self) -> None:
        """Delete figures of earlier renders that this render does not show."""
        for path in (self.run_dir / IMAGES_DIR).glob("*.*"):
            if path.suffix in (".png", ".jpg") and path.name not in self.written:
                path.unlink(missing_ok=True)


def digest(text: str) -> str:
    """A file-name-safe digest (image ids and class names are user data)."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]






# --- per-class results ----------------------------------------------------------------------


def judged_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """Audited images whose correctness is known (they have usable labels)."""
    return predictions[predictions["error"].isna() & predictions["correct"].notna()]


def class_table(predictions: pd.DataFrame, classes: list[str], multilabel: bool) -> list[dict[str, Any]]:
    """Per class: images, recall, precision, mean top-1 confidence, errors.

    Multi-class errors are the class's images predicted as another class; multi-label
    errors are the class's misses plus its false alarms.
    """
    judged = judged_rows(predictions)
    labels = label_matrix([_ids(v) for v in judged["labels"]], tuple(classes))
    predicted = label_matrix([_ids(v) for v in judged["predicted"]], tuple(classes))
    confidence = judged["confidence"].to_numpy(dtype=np.float64)
    hits = (labels & predicted).sum(axis=0)
    images, called = labels.sum(axis=0), predicted.sum(axis=0)
    errors = images - hits + (called - hits if multilabel else 0)
    rows = []
    for k, name in enumerate(classes):
        mine = confidence[labels[:, k]]
        rows.append(
            {
                "name": name,
                "images": int(images[k]),
                "recall": hits[k] / images[k] if images[k] else None,
                "precision": hits[k] / called[k] if called[k] else None,
                "confidence": float(np.nanmean(mine)) if len(mine) and not np.isnan(mine).all() else None,
                "errors": int(errors[k]),
            }
        )
    return rows


def confusion_figure(predictions: pd.DataFrame, classes: list[str], painter: Painter) -> dict[str, str] | None:
    """Multi-class confusion matrix as a PNG (counts in cells, colour normalised per true class)."""
    judged = judged_rows(predictions)
    if judged.empty or not classes:
        return None
    true = judged["labels"].map(lambda v: _ids(v)[0])
    pred = judged["predicted"].map(lambda v: (_ids(v) or [""])[0])
    counts = pd.crosstab(true, pred).reindex(index=classes, columns=classes, fill_value=0)
    note = ""
    if len(classes) > MAX_MATRIX_CLASSES:
        off = counts.to_numpy() * (1 - np.eye(len(classes), dtype=np.int64))
        keep = np.sort(np.argsort(-(off.sum(axis=0) + off.sum(axis=1)), kind="stable")[:MAX_MATRIX_CLASSES])
        counts = counts.iloc[keep, keep]
        note = f"Showing the {MAX_MATRIX_CLASSES} of {len(classes)} classes involved in the most errors."
    src = painter.save("confusion-matrix.png", lambda tmp: draw_confusion(counts, tmp))
    return {"src": src, "note": note}


def reliability_figure(predictions: pd.DataFrame, painter: Painter) -> dict[str, Any] | None:
    """Reliability diagram (accuracy against confidence per bin) and the ECE, multi-class runs."""
    judged = judged_rows(predictions)
    if judged.empty:
        return None
    result = reliability_of(judged)
    src = painter.save("reliability.png", lambda tmp: draw_reliability(result, tmp))
    filled = result.counts > 0
    over = float((result.counts * np.where(filled, result.confidence - result.accuracy, 0)).sum() / result.counts.sum())
    return {"src": src, "ece": percent(result.ece), "bins": len(result.counts),
            "direction": "over-confident" if over > 0 else "under-confident"}


def draw_reliability(result, path: Path) -> None:
    """Bars of accuracy per confidence bin against the diagonal, with the bins' image counts."""
    figure = Figure(figsize=(4.2, 3.4), dpi=100)
    axes = figure.add_subplot()
    width = result.edges[1] - result.edges[0]
    filled = result.counts > 0
    axes.bar(result.edges[:-1][filled], result.accuracy[filled], width=width, align="edge",
             color="#4a78b5", edgecolor="white", label="accuracy")
    axes.bar(result.edges[:-1][filled], (result.confidence - result.accuracy)[filled], width=width, align="edge",
             bottom=result.accuracy[filled], color="#e69500", alpha=0.45, edgecolor="white", label="gap to confidence")
    axes.plot([0, 1], [0, 1], color="#1f2a36", linewidth=0.8, linestyle="--", label="calibrated")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("top-1 confidence", fontsize=8)
    axes.set_ylabel("accuracy", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.legend(fontsize=7, loc="upper left", frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=64).save(path, format="PNG", optimize=True)


MAX_SLICE_VALUES = 20  # attributes with more distinct values are identifiers, not slices


def slice_rows(predictions: pd.DataFrame) -> list[dict[str, Any]]:
    """Per manifest attribute value: images, accuracy with its 95% Wilson interval, mean confidence."""
    judged = judged_rows(predictions)
    if judged.empty:
        return []
    attributes = pd.DataFrame([dict(attribute_pairs(cell)) for cell in judged["attributes"]], index=judged.index)
    correct = judged["correct"].astype(bool)
    rows = []
    for name in sorted(attributes.columns):
        values = attributes[name].dropna().astype(str)
        if not 2 <= values.nunique() <= MAX_SLICE_VALUES:
            continue
        for value, index in values.groupby(values).groups.items():
            n = len(index)
            k = int(correct.loc[index].sum())
            low, high = wilson_interval(np.float64(k), np.float64(n), 1.959964)
            rows.append({
                "attribute": name, "value": value, "images": n, "accuracy": percent(k / n),
                "interval": f"{low:.0%}-{high:.0%}", "confidence": score(judged.loc[index, "confidence"].mean()),
            })
    return rows


def trends_view(out_dir: Path, run_id: str, painter: Painter, limit: int = 12) -> dict[str, Any] | None:
    """This run against the earlier runs of the same model on the same source (the ``metrics``
    table's per-run rows); None before the second run."""
    metrics = read_table(out_dir, "metrics")
    mine = metrics[(metrics["run_id"] == run_id) & (metrics["metric"] == "accuracy")]
    if mine.empty:
        return None
    series = mine["detail"].iloc[0]
    rows = metrics[(metrics["detail"] == series) & metrics["metric"].isin(TREND_METRICS)]
    table = rows.pivot_table(index="run_id", columns="metric", values="value", aggfunc="first", dropna=False)
    table = table.sort_index().loc[:run_id].tail(limit)
    if len(table) < 2:
        return None
    src = painter.save("trends.png", lambda tmp: draw_trends(table, tmp))
    previous, current = table.iloc[-2], table.iloc[-1]

    def change(name: str, scale: float = 100.0, unit: str = " pp") -> str:
        delta = current.get(name, np.nan) - previous.get(name, np.nan)
        return "n/a" if pd.isna(delta) else f"{delta * scale:+.{1 if unit else 0}f}{unit}"

    return {
        "src": src,
        "previous": table.index[-2],
        "changes": [("Accuracy", change("accuracy")), ("Top-5 accuracy", change("top5_accuracy")),
                    ("ECE", change("ece")), ("High findings", change("findings_high", 1.0, "")),
                    ("All findings", "n/a" if pd.isna(current.get("findings_high")) else
                     f"{_findings_total(current) - _findings_total(previous):+.0f}")],
        "rows": [
            {"run_id": rid, "accuracy": percent(row.get("accuracy")), "ece": percent(row.get("ece")),
             "findings": " / ".join(str(int(row.get(f"findings_{s}", 0) or 0)) for s in SEVERITIES),
             "current": rid == run_id}
            for rid, row in table.iloc[::-1].iterrows()
        ],
    }


TREND_METRICS = ("accuracy", "top5_accuracy", "ece", "findings_high", "findings_medium", "findings_low")


def _findings_total(row: pd.Series) -> float:
    return float(sum(row.get(f"findings_{s}", 0) or 0 for s in SEVERITIES))


def _run_label(run_id: str) -> str:
    """'r20261123-070555-3e59a1' -> '11-23 07:05:55' (other run ids as they are, shortened)."""
    if len(run_id) >= 16 and run_id[0] == "r" and run_id[1:9].isdigit() and run_id[10:16].isdigit():
        return f"{run_id[5:7]}-{run_id[7:9]} {run_id[10:12]}:{run_id[12:14]}:{run_id[14:16]}"
    return run_id[:16]


def draw_trends(table: pd.DataFrame, path: Path) -> None:
    """Accuracy and ECE per run (left), findings per severity (right)."""
    figure = Figure(figsize=(7.2, 2.6), dpi=100)
    left, right = figure.subplots(1, 2)
    x = np.arange(len(table))
    labels = [_run_label(rid) for rid in table.index]
    for name, colour in (("accuracy", "#4a78b5"), ("top5_accuracy", "#9bb7da"), ("ece", "#e69500")):
        if name in table:
            left.plot(x, table[name].to_numpy(float), marker="o", markersize=3, color=colour, label=name.replace("_", " "))
    left.set_ylim(0, 1)
    bottom = np.zeros(len(table))
    for level, colour in (("high", "#c62828"), ("medium", "#e69500"), ("low", "#7b8794")):
        values = table.get(f"findings_{level}", pd.Series(0, index=table.index)).fillna(0).to_numpy(float)
        right.bar(x, values, bottom=bottom, color=colour, label=level)
        bottom += values
    for axes, title in ((left, "accuracy and calibration error"), (right, "findings per run")):
        axes.set_xticks(x, labels, rotation=45, ha="right", fontsize=6)
        axes.tick_params(labelsize=7)
        axes.set_title(title, fontsize=8)
        axes.legend(fontsize=6, frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=64).save(path, format="PNG", optimize=True)


def draw_confusion(counts: pd.DataFrame, path: Path) -> None:
    """Draw the matrix with matplotlib's object API (Agg canvas, no global pyplot state)."""
    values = counts.to_numpy()
    totals = values.sum(axis=1, keepdims=True)
    share = np.divide(values, totals, out=np.zeros(values.shape, dtype=np.float64), where=totals > 0)
    k = len(counts)
    font = 8 if k <= 10 else 6.5 if k <= 18 else 6
    side = min(7.2, 2.4 + 0.24 * k)
    figure = Figure(figsize=(side + 0.4, side), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    names = [_axis_label(name) for name in counts.index]
    axes.set_xticks(range(k), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=font)
    axes.set_yticks(range(k), names, fontsize=font)
    axes.set_xlabel("predicted class", fontsize=font + 1)
    axes.set_ylabel("true class", fontsize=font + 1)
    for (row, col), count in np.ndenumerate(values):
        if count:
            shade = "white" if share[row, col] > 0.55 else "#1f2a36"
            axes.text(col, row, str(count), ha="center", va="center", fontsize=font, color=shade)
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with Image.open(buffer) as image:  # a 128-colour palette keeps even a 25-class matrix small
        image.convert("RGB").quantize(colors=128).save(path, format="PNG", optimize=True)


def _axis_label(name: str, limit: int = 18) -> str:
    """A class name fit for an axis: shortened, with '$' escaped (no mathtext from user strings)."""
    short = name if len(name) <= limit else name[: limit - 1] + "…"
    return short.replace("$", r"\$")


# --- unreadable images and appendix ----------------------------------------------------------


def unreadable_rows(predictions: pd.DataFrame) -> dict[str, Any]:
    """Up to MAX_UNREADABLE_ROWS (uri, error) pairs, and how many more there are."""
    bad = predictions[predictions["error"].notna()]
    shown = bad.head(MAX_UNREADABLE_ROWS)
    return {
        "rows": list(zip(shown["uri"].astype(str), shown["error"].astype(str))),
        "total": len(bad),
        "more": len(bad) - len(shown),
    }


def appendix(record: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Key/value tables of everything in run.json that makes the run reproducible."""
    model, data = record.get("model") or {}, record.get("data") or {}
    parameters = dict(record.get("parameters") or {})
    thresholds = parameters.pop("thresholds", None) or {}
    preprocess = {f"preprocess {k}": v for k, v in (record.get("preprocess") or {}).items()}
    timings = {k: f"{v:.2f} s" if isinstance(v, (int, float)) else v for k, v in (record.get("timings") or {}).items()}
    sections = [
        ("Run", {k: record.get(k) for k in ("run_id", "started", "finished") if record.get(k)}),
        ("Model", model),
        ("Data", data | preprocess),
        ("Parameters", parameters),
        ("Thresholds", thresholds),
        ("Versions", record.get("versions") or {}),
        ("Timings", timings),
    ]
    return [(title, [(str(k), text(v)) for k, v in values.items()]) for title, values in sections if values]


def text(value: Any) -> str:
    """A run.json value as one line of text."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(text(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    return str(value)


# --- rendering --------------------------------------------------------------------------------


def environment(template_dir: Path | None) -> Environment:
    """Jinja2 with autoescape ON; a user folder's files win over the default ones of the same name."""
    folders = ([Path(template_dir)] if template_dir else []) + [DEFAULT_TEMPLATES]
    env = Environment(
        loader=ChoiceLoader([FileSystemLoader(str(folder)) for folder in folders]),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["percent"] = percent
    env.filters["number"] = number
    env.filters["score"] = score
    return env


def stylesheet(env: Environment) -> Markup:
    """The report.css of the template folder, inlined so that report.html is one offline file."""
    source, _, _ = env.loader.get_source(env, STYLESHEET_NAME)  # type: ignore[union-attr]
    return Markup(source)


def write_pdf(html_path: Path, run_dir: Path, target: Path) -> None:
    """Lay the HTML out as the PDF; only local files and data: URLs are fetched (offline, no surprises)."""
    fetcher = URLFetcher(allowed_protocols=("file", "data"))
    # font-subsetting notices ("Using fontTools instead of HarfBuzz-Subset") are not the user's concern
    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    HTML(filename=str(html_path), base_url=str(run_dir), url_fetcher=fetcher).write_pdf(str(target))


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a hidden temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
