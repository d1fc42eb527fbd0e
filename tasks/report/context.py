"""The template's context: which images the report shows, then every section's view.

Figures are drawn for the shown images only (the evidence of each finding, the failure
gallery and the real images beside the class impressions), never for the whole table.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from visaudit.tasks.audit.gate import GateOutcome
from visaudit.tasks.explain.feature_index import FEATURES_DIR
from visaudit.tasks.report.adversarial import adversarial_view
from visaudit.tasks.report.classes import calibration_view, class_table, confusion_view, slice_rows
from visaudit.tasks.report.examples import failure_gallery, gallery_example, layer_strips
from visaudit.tasks.report.figures import OCCLUSION_LAYER, Painter
from visaudit.tasks.report.impressions import (
    IMPRESSION_EXAMPLES,
    colour_notes,
    impression_examples,
    impressions_view,
    label_peaks,
)
from visaudit.tasks.report.inputs import RunInputs
from visaudit.tasks.report.localisation import localisation_view
from visaudit.tasks.report.methods import (
    explained_layer,
    faithfulness_view,
    feature_ids,
    feature_view,
    methods_view,
    missing_figures,
    sanity_view,
)
from visaudit.tasks.report.overview import (
    appendix,
    chance_note,
    evidence_ids,
    finding_view,
    group_by_kind,
    headline_metrics,
    run_summary,
    sort_findings,
    unreadable_ids,
    unreadable_rows,
    verdict,
)
from visaudit.tasks.report.trends import trends_view

OVERVIEW_FINDINGS = 10  # findings listed on the cover page
MAP_COLUMNS = ["image_id", "method", "layer", "target", "height", "width", "heatmap"]
WSL_COLUMNS = ["wsl_box_x0", "wsl_box_y0", "wsl_box_x1", "wsl_box_y1"]  # drawn on the overlays
PEAK_COLUMNS = ["method", "is_label", "layer", "target", "peak_x", "peak_y"]


def shown_maps(inputs: RunInputs, shown: set[str]) -> pd.DataFrame:
    """The stored maps of the shown images, occlusion maps included (as method 'occlusion')."""
    explanations = inputs.read("explanations", MAP_COLUMNS + WSL_COLUMNS, shown)
    if not len(inputs.occlusion):
        return explanations
    mine = inputs.read("occlusion", [c for c in MAP_COLUMNS if c not in ("method", "layer")], shown)
    mine = mine.assign(method="occlusion", layer=OCCLUSION_LAYER)
    return pd.concat([explanations, mine[MAP_COLUMNS]], ignore_index=True)


def report_context(inputs: RunInputs, gallery_size: int, evidence_per_finding: int) -> tuple[dict[str, Any], Painter]:
    """Everything the template shows, and the painter that drew its figures."""
    record, predictions = inputs.record, inputs.predictions
    multilabel, classes = record.multi_label, inputs.classes
    findings = sort_findings(inputs.findings)
    evidence = [evidence_ids(row, evidence_per_finding) for _, row in findings.iterrows()]
    failures = failure_gallery(predictions, gallery_size)["image_id"].tolist()
    class_examples = impression_examples(predictions, inputs.impressions["class_name"], IMPRESSION_EXAMPLES)
    shown = {image_id for ids in evidence for image_id in ids} | set(failures)
    shown |= {image_id for ids in class_examples.values() for image_id in ids}
    unreadable = unreadable_ids(predictions)
    rows = inputs.rows(shown | set(unreadable) | set(feature_ids(inputs.features)))
    by_id = rows.set_index("image_id", drop=False)  # every column, of the images the report names
    painter = Painter(inputs.run_dir, record.preprocessing(), shown_maps(inputs, shown), list(record.model.layers))
    painter.decode(rows[rows["image_id"].isin(shown)])
    strip_ids = dict.fromkeys([*(i for ids in evidence for i in ids), *failures])
    views = [finding_view(row, [by_id.loc[i] for i in ids if i in by_id.index], painter)
             for (_, row), ids in zip(findings.iterrows(), evidence)]
    near_chance = chance_note(record)
    context = {
        "run": run_summary(record),
        "near_chance": near_chance,
        "metrics": headline_metrics(predictions, classes, multilabel),
        "verdict": verdict(findings),
        "gate": GateOutcome.load(inputs.run_dir),
        "findings": group_by_kind(views) if near_chance else views,
        "overview_limit": OVERVIEW_FINDINGS,
        "multilabel": multilabel,
        "class_rows": class_table(predictions, classes, multilabel),
        "confusion": None if multilabel else confusion_view(predictions, classes, painter),
        "gallery": [gallery_example(by_id.loc[i], painter, multilabel) for i in failures],
        "layer_strips": layer_strips([by_id.loc[i] for i in strip_ids if i in by_id.index], painter),
        "methods": methods_view(record, painter.methods),
        "explained_layer": explained_layer(record),
        "sanity": sanity_view(inputs.metrics, record),
        "features": feature_view(inputs.features, by_id),
        "features_missing": missing_figures(record, inputs.run_dir, FEATURES_DIR),
        "impressions": None if inputs.impressions.empty else impressions_view(  # the peaks only when shown
            inputs.impressions, class_examples, by_id, painter, label_peaks(inputs.read("explanations", PEAK_COLUMNS)),
            colour_notes(findings)),
        "faithfulness": faithfulness_view(inputs.occlusion, inputs.metrics),
        "adversarial": adversarial_view(inputs.adversarial, painter),
        "localisation": localisation_view(inputs.metrics),
        "unreadable": unreadable_rows(predictions, by_id),
        "calibration": None if multilabel else calibration_view(predictions, painter),
        "slices": slice_rows(predictions),
        "trends": trends_view(inputs.history, inputs.run_id, painter),
        "appendix": appendix(record),
    }
    return context, painter
