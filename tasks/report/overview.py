"""The cover and the run-wide sections: identity lines, headline numbers, the verdict and the
findings (most severe first, each with its evidence), the unreadable images and the appendix."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import pandas as pd

from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.findings.causes import finding_name
from visaudit.tasks.findings.metrics import summary_metrics
from visaudit.tasks.findings.thresholds import SEVERITY_ORDER
from visaudit.tasks.report.examples import Example, evidence_example
from visaudit.tasks.report.figures import Painter
from visaudit.tasks.report.formatting import format_date, names, number, optional_str, percent, text

SEVERITIES = tuple(SEVERITY_ORDER)  # high, medium, low
MAX_UNREADABLE_ROWS = 50
DATA_KINDS = ("class_imbalance", "near_duplicate")  # about the data alone: listed even near chance
SUMMARY_COLUMNS = ["error", "correct", "labels", "top_classes", "confidence"]  # what ``summary_metrics`` reads


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
    summary = summary_metrics(predictions[SUMMARY_COLUMNS], multilabel)
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
        measure=f"{finding['metric']} = {number(finding['value'])} (threshold {number(finding['threshold'])})"
        + _cause_note(optional_str(finding.get("cause")), finding_name(finding["kind"], class_name, slice_text)),
        examples=[evidence_example(row, class_name, painter, layer) for row in evidence],
    )


def _cause_note(cause: str | None, own: str) -> str:
    """The measure line's note on a finding that shares its cause with others (``findings.causes``)."""
    if cause is None:
        return ""
    return "; one cause with other findings, best explained here" if cause == own else f"; one cause, explained by {cause}"


def slice_value(slice_text: str | None, key: str) -> str | None:
    """The value of ``key`` in a slice string such as 'layer=layer4'."""
    for part in (slice_text or "").split(","):
        name, _, value = part.partition("=")
        if name.strip() == key and value:
            return value.strip()
    return None


def unreadable_ids(predictions: pd.DataFrame) -> list[str]:
    """The first MAX_UNREADABLE_ROWS images that could not be read, the ones listed."""
    return predictions.loc[predictions["error"].notna(), "image_id"].head(MAX_UNREADABLE_ROWS).tolist()


def unreadable_rows(predictions: pd.DataFrame, by_id: pd.DataFrame) -> Unreadable:
    """The images that could not be read, with their errors (``by_id``: the listed ones'
    ``predictions`` rows by image id, for their uris)."""
    bad = predictions[predictions["error"].notna()]
    shown = bad.head(MAX_UNREADABLE_ROWS)
    return Unreadable(
        rows=list(zip(by_id.loc[shown["image_id"], "uri"].astype(str), shown["error"].astype(str))),
        total=len(bad),
        more=len(bad) - len(shown),
    )


def chance_note(record: RunRecord) -> str | None:
    """The cover's first words when the audit's accuracy interval reaches chance, else None."""
    chance = record.near_chance
    if chance is None or not chance.near:
        return None
    what = "exact-match accuracy" if chance.metric == "exact_match" else "accuracy"
    return (f"The model is near chance on this data: its {what} is {percent(chance.value)} on {chance.images:,} "
            f"images (95% interval {percent(chance.low)} to {percent(chance.high)}), and always answering the most "
            f"common label would score {percent(chance.chance)}. It has not learnt this data as given, or the "
            "setup (preprocessing, class names) does not fit it: the findings that follow from that are grouped "
            "by kind below, and none of them should be read as a property of the data until that is fixed.")


def group_by_kind(views: list[FindingView]) -> list[FindingView]:
    """Near chance: one block per kind (the model's findings on several classes follow from one
    cause), in the order of each kind's most severe finding; the data's own kinds stay per class."""
    groups: dict[str, list[FindingView]] = {}
    for view in views:
        groups.setdefault(f"{view.kind}:{view.class_name}" if view.kind in DATA_KINDS else view.kind, []).append(view)
    out = []
    for members in groups.values():
        first = members[0]
        if len(members) == 1:
            out.append(first)
            continue
        classes = ", ".join(v.class_name or v.slice or "all" for v in members)
        out.append(replace(first, class_name=classes, slice=None, measure=f"{len(members)} findings; first: {first.measure}",
                           message=f"Raised on {len(members)} classes ({classes}) of a model near chance: they follow "
                                   f"from the model not having learnt this data, not from each class. First: "
                                   f"{first.message}"))
    return out


def appendix(record: RunRecord) -> list[tuple[str, list[tuple[str, str]]]]:
    """Key/value tables of everything in run.json that makes the run reproducible."""
    parameters = dict(record.parameters)
    thresholds = parameters.pop("thresholds", None) or {}
    preprocess = {f"preprocess {k}": v for k, v in record.preprocess.items()}
    timings = {k: f"{v:.2f} s" for k, v in record.timings.items()}
    setup = _flatten(asdict(record.setup)) if record.setup is not None else {"setup checks": "skipped"}
    if record.near_chance is not None:
        setup |= _flatten({"audit near_chance": asdict(record.near_chance)})
    sections = [
        ("Run", {k: getattr(record, k) for k in ("run_id", "started", "finished") if getattr(record, k)}),
        ("Model", record.model.model_dump(mode="json")),
        ("Data", record.data.model_dump(mode="json") | preprocess),
        ("Parameters", parameters),
        ("Thresholds", thresholds),
        ("Setup checks", setup),
        ("Versions", record.versions),
        ("Timings", timings),
    ]
    return [(title, [(str(k), text(v)) for k, v in values.items()]) for title, values in sections if values]


def _flatten(values: dict[str, object], prefix: str = "") -> dict[str, object]:
    """Nested dicts as ``a b: value`` rows."""
    out: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix} {key}".strip()
        out |= _flatten(value, name) if isinstance(value, dict) else {name: value}
    return out
