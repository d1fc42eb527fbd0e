"""Finding detectors on small hand-made tables: each fires on its signal and not without it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from visaudit.tasks.findings.compute import FindingInputs, Thresholds, compute_findings


def _predictions(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": [f"i{n}" for n in range(len(rows))],
            "labels": [[t] for t, _, _ in rows],
            "predicted": [[p] for _, p, _ in rows],
            "confidence": [c for _, _, c in rows],
            "correct": [t == p for t, p, _ in rows],
            "error": [None] * len(rows),
        }
    )


def _findings(preds: pd.DataFrame, explanations: pd.DataFrame, classes: list[str], thresholds: Thresholds) -> pd.DataFrame:
    return compute_findings(FindingInputs(preds, explanations, classes, multi_label=False, layer=None), thresholds)


def _explanations(preds: pd.DataFrame, energy: dict[str, float], area: float = 0.2) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": preds["image_id"],
            "method": "gradcam",
            "layer": "layer4",
            "target": [labels[0] for labels in preds["labels"]],
            "is_label": True,
            "energy_in_box": [energy[labels[0]] for labels in preds["labels"]],
            "box_area_fraction": area,
            "pointing_hit": [energy[labels[0]] > area for labels in preds["labels"]],
        }
    )


def test_each_detector_fires_on_its_signal() -> None:
    rows = [("cat", "cat", 0.8)] * 20 + [("dog", "dog", 0.8)] * 14 + [("dog", "cat", 0.97)] * 6 + [("fox", "fox", 0.9)] * 2
    preds = _predictions(rows)
    findings = _findings(preds, _explanations(preds, {"cat": 0.7, "dog": 0.15, "fox": 0.6}),
                                ["cat", "dog", "fox"], Thresholds())
    kinds = set(zip(findings["kind"], findings["class_name"]))
    assert ("confident_error", "dog") in kinds
    assert ("confused_pair", "dog") in kinds
    assert ("class_imbalance", "fox") in kinds
    assert ("attention_off_object", "dog") in kinds
    assert ("attention_off_object", "cat") not in kinds
    off = findings[findings["kind"] == "attention_off_object"].iloc[0]
    assert off["value"] == 0.0 and off["threshold"] == 0.5  # no dog map beats a uniform one in the box
    assert off["severity"] == "high" and "0 of 20 images" in off["message"]
    confident = findings[findings["kind"] == "confident_error"].iloc[0]
    assert confident["value"] == 6 / 20 and len(confident["evidence"]) == 6
    assert set(confident["evidence"]) <= set(preds["image_id"])
    assert list(findings["severity"]) == sorted(findings["severity"], key=["high", "medium", "low"].index)


def test_clean_balanced_accurate_run_has_no_findings() -> None:
    rows = [(c, c, 0.9) for c in ("cat", "dog", "fox") for _ in range(10)]
    preds = _predictions(rows)
    findings = _findings(preds, _explanations(preds, {"cat": 0.7, "dog": 0.6, "fox": 0.8}),
                                ["cat", "dog", "fox"], Thresholds())
    assert findings.empty


def test_thresholds_are_configurable() -> None:
    rows = [("cat", "cat", 0.8)] * 19 + [("cat", "dog", 0.95)] + [("dog", "dog", 0.8)] * 20
    preds = _predictions(rows)
    default = _findings(preds, pd.DataFrame(columns=["energy_in_box"]), ["cat", "dog"], Thresholds())
    assert (default["kind"] == "confident_error").sum() == 1
    strict = _findings(preds, pd.DataFrame(columns=["energy_in_box"]), ["cat", "dog"],
                              Thresholds(confident_error_confidence=0.99))
    assert (strict["kind"] == "confident_error").sum() == 0


def test_unreadable_images_are_not_judged() -> None:
    preds = _predictions([("cat", "cat", 0.9)] * 10 + [("dog", "dog", 0.9)] * 10)
    broken = pd.DataFrame({"image_id": ["x1"], "labels": [["fox"]], "predicted": [None], "confidence": [np.nan],
                           "correct": [None], "error": ["OSError: truncated"]})
    findings = _findings(pd.concat([preds, broken], ignore_index=True),
                                pd.DataFrame(columns=["energy_in_box"]), ["cat", "dog", "fox"], Thresholds())
    assert not ((findings["kind"] == "class_imbalance") & (findings["class_name"] == "cat")).any()
