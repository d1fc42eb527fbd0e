"""The cover and the run-wide sections: identity lines, headline numbers, the verdict and the
findings (most severe first, each with its evidence), the unreadable images and the appendix."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.findings.metrics import summary_metrics
from visaudit.tasks.findings.thresholds import SEVERITY_ORDER
from visaudit.tasks.report.examples import Example, evidence_example
from visaudit.tasks.report.figures import Painter
from visaudit.tasks.report.formatting import format_date, names, number, optional_str, percent, text

SEVERITIES = tuple(SEVERITY_ORDER)  # high, medium, low
MAX_UNREADABLE_ROWS = 50


@dataclass(frozen=True)
class RunSummary:
    """The cover's identity lines."""

    run_id: str
    model: str
    source: str
    task: str
    date: str


@dataclass(frozen=True)
class FindingView:
    """One finding block: badge, message, the measured number against its threshold, evidence."""

    kind: str
    severity: str
    class_name: str | None
    slice: str | None
    low_confidence: bool
    message: str
    measure: str
    examples: list[Example]


@dataclass(frozen=True)
class Unreadable:
    """Up to MAX_UNREADABLE_ROWS (uri, error) pairs, how many images could not be read, how many are not listed."""

    rows: list[tuple[str, str]]
    total: int
    more: int


def run_summary(record: RunRecord) -> RunSummary:
    """Model, data, run id and date, from run.json."""
    return RunSummary(
        run_id=record.run_id,
        model=record.model.name or "unnamed model",
        source=record.data.source or "unknown source",
        task=record.model.task,
        date=format_date(record.finished or record.started),
    )


def headline_metrics(predictions: pd.DataFrame, classes: list[str], multilabel: bool) -> list[tuple[str, str]]:
    """Key numbers, computed from the tables (the tables are the truth, run.json may be older)."""
    summary = summary_metrics(predictions, multilabel)
    spread = "n/a"
    if summary.class_accuracy_min is not None and summary.class_accuracy_max is not None:
        spread = f"{percent(summary.class_accuracy_min)} to {percent(summary.class_accuracy_max)}"
    return [
        ("Images", f"{summary.images:,}"),
        ("Audited", f"{summary.audited:,}"),
        ("Unreadable", f"{summary.unreadable:,}"),
        ("Exact-match accuracy" if multilabel else "Accuracy", percent(summary.accuracy)),
        ("Top-5 accuracy", percent(summary.top5_accuracy)),
        ("Per-class accuracy", spread),
        ("Calibration error (ECE)", percent(summary.ece)),
        ("Classes", f"{len(classes):,}"),
    ]


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


def evidence_ids(finding: pd.Series, limit: int) -> list[str]:
    """The first ``limit`` evidence image ids of a finding."""
    return names(finding["evidence"])[:limit]


def finding_view(finding: pd.Series, evidence: list[pd.Series], painter: Painter) -> FindingView:
    """One finding with its evidence images (``evidence``: their ``predictions`` rows)."""
    class_name, slice_text = optional_str(finding.get("class_name")), optional_str(finding.get("slice"))
    layer = slice_value(slice_text, "layer")
    return FindingView(
        kind=finding["kind"],
        severity=finding["severity"],
        class_name=class_name,
        slice=slice_text,
        low_confidence=optional_str(finding.get("confidence")) == "low",
        message=finding["message"],
        measure=f"{finding['metric']} = {number(finding['value'])} (threshold {number(finding['threshold'])})",
        examples=[evidence_example(row, class_name, painter, layer) for row in evidence],
    )


def slice_value(slice_text: str | None, key: str) -> str | None:
    """The value of ``key`` in a slice string such as 'layer=layer4'."""
    for part in (slice_text or "").split(","):
        name, _, value = part.partition("=")
        if name.strip() == key and value:
            return value.strip()
    return None


def unreadable_rows(predictions: pd.DataFrame) -> Unreadable:
    """The images that could not be read, with their errors."""
    bad = predictions[predictions["error"].notna()]
    shown = bad.head(MAX_UNREADABLE_ROWS)
    return Unreadable(
        rows=list(zip(shown["uri"].astype(str), shown["error"].astype(str))),
        total=len(bad),
        more=len(bad) - len(shown),
    )


def appendix(record: RunRecord) -> list[tuple[str, list[tuple[str, str]]]]:
    """Key/value tables of everything in run.json that makes the run reproducible."""
    parameters = dict(record.parameters)
    thresholds = parameters.pop("thresholds", None) or {}
    preprocess = {f"preprocess {k}": v for k, v in record.preprocess.items()}
    timings = {k: f"{v:.2f} s" for k, v in record.timings.items()}
    sections = [
        ("Run", {k: getattr(record, k) for k in ("run_id", "started", "finished") if getattr(record, k)}),
        ("Model", record.model.model_dump(mode="json")),
        ("Data", record.data.model_dump(mode="json") | preprocess),
        ("Parameters", parameters),
        ("Thresholds", thresholds),
        ("Versions", record.versions),
        ("Timings", timings),
    ]
    return [(title, [(str(k), text(v)) for k, v in values.items()]) for title, values in sections if values]
