"""A committed run against the previous run of its series (the runs sharing its series key,
``metrics.detail`` of its per-run rows, ordered by run id as the report's trends are).

What changed, for the Prefect artifacts and events a run publishes: the headline numbers
and their change, the findings (kind, subject) the previous run did not have, and the
accuracies (overall and per class) that fell by more than a margin with a paired 95%
interval (``findings.paired``) excluding zero, on the images both runs judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from visaudit.tasks.audit.commit import RUN_METRICS
from visaudit.tasks.audit.compare import ClassChange, FindingChange, class_changes, finding_changes, paired_predictions
from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.data import storage
from visaudit.tasks.findings.paired import paired_change

HEADLINE = (*RUN_METRICS, "findings_high", "findings_medium", "findings_low")
PAIRED_COLUMNS = ["image_id", "uri", "labels", "predicted", "confidence", "correct", "error"]  # paired_predictions'


@dataclass(frozen=True)
class SeriesChange:
    """This run's headline numbers and what changed since the previous run of its series."""

    run_id: str
    series: str
    previous: str | None
    headline: dict[str, float | None]
    deltas: dict[str, float | None]  # this run minus the previous (None without one)
    findings: pd.DataFrame  # this run's findings
    new_findings: list[FindingChange]  # (kind, subject) absent from the previous run: every one without it
    drops: list[ClassChange]  # class_name None: overall accuracy
    paired_images: int  # images judged in both runs


def run_headline(history: pd.DataFrame, run_id: str) -> tuple[str, dict[str, float | None]]:
    """The run's series key and per-run numbers, from its ``metrics`` rows."""
    mine = history[(history["run_id"] == run_id) & history["metric"].isin(HEADLINE)]
    if mine.empty:
        raise ValueError(f"run {run_id} has no per-run metrics rows; was it committed?")
    values = mine.drop_duplicates("metric").set_index("metric")["value"]
    return str(mine["detail"].iloc[0]), {name: (None if pd.isna(values.get(name)) else float(values[name]))
                                         for name in HEADLINE}


def previous_run(history: pd.DataFrame, run_id: str, series: str) -> str | None:
    """The latest run of ``series`` before ``run_id`` (run ids sort by start time)."""
    earlier = history[(history["metric"] == "accuracy") & (history["detail"] == series) & (history["run_id"] < run_id)]
    return str(earlier["run_id"].max()) if len(earlier) else None


def series_change(out_dir: Path, run_id: str, margin: float) -> SeriesChange:
    """This run against the previous run of its series; drops are falls of more than
    ``margin`` whose paired interval lies below zero."""
    out_dir = Path(out_dir)
    history = storage.read_table(out_dir, "metrics")
    series, headline = run_headline(history, run_id)
    previous = previous_run(history, run_id, series)
    findings = storage.read_table(out_dir, "findings", run_id)
    if previous is None:
        return SeriesChange(run_id, series, None, headline, dict.fromkeys(HEADLINE), findings,
                            finding_changes(findings.iloc[:0], findings), [], 0)
    _, before = run_headline(history, previous)
    deltas = {name: None if headline[name] is None or before[name] is None else headline[name] - before[name]
              for name in HEADLINE}
    changes = finding_changes(storage.read_table(out_dir, "findings", previous), findings)
    pairs = paired_predictions(storage.read_table(out_dir, "predictions", previous, columns=PAIRED_COLUMNS),
                               storage.read_table(out_dir, "predictions", run_id, columns=PAIRED_COLUMNS))
    drops: list[ClassChange] = []
    if len(pairs):
        multi_label = RunRecord.load(out_dir / "runs" / run_id).multi_label
        overall = ClassChange(None, paired_change(pairs["correct_a"].to_numpy(), pairs["correct_b"].to_numpy()))
        drops = [c for c in [overall, *class_changes(pairs, multi_label)]
                 if c.change.change < -margin and c.change.high < 0]
    return SeriesChange(run_id, series, previous, headline, deltas, findings,
                        [f for f in changes if f.status == "appeared"], drops, len(pairs))
