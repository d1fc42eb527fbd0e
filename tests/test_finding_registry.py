"""The findings layer's records and registry: typed findings, derived order and map-dependence,
the judged sanity step, the fixed-location metric rows and the proportion intervals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from visaudit.tasks.data.records import MetricRow, metric_frame
from visaudit.tasks.data.schema import table_schema
from visaudit.tasks.findings.compute import Finding, FindingInputs, Thresholds, compute_findings, mark_low_confidence
from visaudit.tasks.findings.fixed_location import location_metric_rows
from visaudit.tasks.findings.probe_records import LocationCandidate, LocationProbe
from visaudit.tasks.findings.registry import DETECTORS, KIND_RANK, MAP_BASED
from visaudit.tasks.findings.stats import wilson_interval
from visaudit.tasks.findings.unfaithful_explanation import judged_sanity_step, sanity_steps


def _finding(**fields) -> Finding:
    return Finding(**{"kind": "attention_off_object", "severity": "high", "class_name": "cat", "metric": "m",
                      "value": 1.0, "threshold": 1.5, "message": "Seen."} | fields)


def test_finding_rows_have_the_table_columns() -> None:
    row = _finding(evidence=("a", "b"), undermines_maps="why").to_row()
    assert list(row) == table_schema("findings").names
    assert row["evidence"] == ["a", "b"] and row["confidence"] == "normal" and row["slice"] is None
    with pytest.raises(ValueError, match="severity"):
        _finding(severity="urgent")
    with pytest.raises(ValueError, match="confidence"):
        _finding(confidence="maybe")


def test_order_and_map_dependence_come_from_the_registry() -> None:
    kinds = [d.kind for d in DETECTORS]
    assert kinds[:4] == ["attention_fixed_location", "shortcut_cue", "shortcut_property", "colour_shortcut"]
    assert kinds[-1] == "class_imbalance" and len(set(kinds)) == len(kinds) == len(KIND_RANK)
    assert MAP_BASED == {"attention_off_object", "attention_fixed_location"}
    assert {d.kind for d in DETECTORS if not d.multi_label} == {"confident_error", "confused_pair", "likely_label_error",
                                                                 "error_slice", "adversarial_fragility"}


def test_undermined_maps_lower_only_map_based_findings_of_their_class() -> None:
    unfaithful = _finding(kind="unfaithful_explanation", class_name="dog", undermines_maps="dog's maps disagree")
    found = mark_low_confidence([_finding(class_name="dog"), _finding(class_name="cat"),
                                 _finding(kind="confident_error", class_name="dog"), unfaithful])
    assert [f.confidence for f in found] == ["low", "normal", "normal", "normal"]
    assert found[0].message == "Seen. Low confidence: dog's maps disagree."
    everywhere = mark_low_confidence([_finding(), replace(unfaithful, class_name=None)])
    assert everywhere[0].confidence == "low"


def test_the_sanity_check_is_judged_on_step_two_in_step_order() -> None:
    details = pd.Series(["2:fc+l4", "1:fc", "10:fc+l4+l3+l2+l1+l0+a+b+c+d", "3:fc+l4+l3", "1:fc"])
    assert sanity_steps(details) == ["1:fc", "2:fc+l4", "3:fc+l4+l3", "10:fc+l4+l3+l2+l1+l0+a+b+c+d"]
    assert judged_sanity_step(details) == "2:fc+l4"
    assert judged_sanity_step(["1:fc"]) == "1:fc" and judged_sanity_step([]) is None


def test_a_missing_input_skips_its_detectors() -> None:
    predictions = pd.DataFrame({"image_id": ["a", "b"], "labels": [["cat"], ["dog"]], "predicted": [["cat"], ["dog"]],
                                "confidence": [0.9, 0.9], "correct": [True, True], "error": [None, None]})
    inputs = FindingInputs(predictions, pd.DataFrame(), ["cat", "dog"], multi_label=False, layer=None,
                           signals=pd.DataFrame(), impressions=pd.DataFrame())
    findings = compute_findings(inputs, Thresholds())
    assert findings.empty and list(findings.columns) == table_schema("findings").names


def test_location_metric_rows_are_the_probed_candidates_numbers() -> None:
    candidates = [LocationCandidate("cat", 0.1, 0.1, 0.8, 20, ("a", "b")), LocationCandidate("dog", 0.5, 0.5, 0.6, 20, ())]
    probes = {"cat": LocationProbe(x=0.125, y=0.1, side=0.125, patch_ratio=0.05, drop=0.6, control_drop=0.01,
                                   flip_share=1.0, images=16)}
    rows = location_metric_rows(candidates, probes, "layer4")
    assert [r.metric for r in rows] == ["fixed_location_peak_share", "fixed_location_patch_ratio", "fixed_location_drop",
                                        "fixed_location_control_drop", "fixed_location_flip_share"]
    assert rows[0] == MetricRow(metric="fixed_location_peak_share", value=0.8, images=16, method="gradcam",
                                layer="layer4", class_name="cat", detail="spot=(0.12, 0.10)")
    frame = metric_frame(rows)
    assert list(frame.columns) == table_schema("metrics").names and frame["images"].dtype == np.int32


def test_wilson_interval_matches_the_closed_form() -> None:
    # 81 of 263 at 95% (Wilson 1927 via Newcombe 1998, Table I example): 0.2553 to 0.3662
    low, high = wilson_interval(np.float64(81), np.float64(263), 1.959964)
    assert low == pytest.approx(0.2553, abs=5e-4) and high == pytest.approx(0.3662, abs=5e-4)
