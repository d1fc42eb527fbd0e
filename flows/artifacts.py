"""What a finished run tells Prefect: artifacts in the UI and events for automations.

Artifacts (keyed by the run's series, so the UI shows each one's history night after night):

- ``visaudit-<series>-summary``: markdown with the verdict, the release gate, the headline
  numbers and their change since the series' previous run, the findings by severity and
  the findings new since that run;
- ``visaudit-<series>-findings``: a table of the findings;
- ``visaudit-<series>-report``: a link to the report (PDF, else HTML).

Events, all on the resource ``visaudit.series.<series>`` (related: the flow run):

- ``visaudit.audit.completed``: the headline numbers, their change, the gate's outcome;
- ``visaudit.finding.new``: one per finding (kind + class, else slice) absent from the
  series' previous run (every finding of a series' first run);
- ``visaudit.metric.dropped``: accuracy, overall or of a class, fell by more than the run's
  ``--drop-margin`` and its paired 95% interval lies below zero.

``<series>`` is the first 12 hex digits of the SHA-1 of the series key
(``audit.commit.series_key``): artifact keys allow only lowercase letters, digits and dashes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from visaudit.tasks.audit.gate import GateOutcome
from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.audit.series import SeriesChange, series_change
from visaudit.tasks.findings.thresholds import SEVERITY_ORDER

COMPLETED, FINDING_NEW, METRIC_DROPPED = "visaudit.audit.completed", "visaudit.finding.new", "visaudit.metric.dropped"
PERCENT_METRICS = ("accuracy", "top5_accuracy", "ece")


def series_digest(series: str) -> str:
    """The series key as an artifact-key-safe name."""
    return hashlib.sha1(series.encode()).hexdigest()[:12]


def artifact_keys(series: str) -> dict[str, str]:
    """The keys of a series' three artifacts."""
    stem = f"visaudit-{series_digest(series)}"
    return {"summary": f"{stem}-summary", "findings": f"{stem}-findings", "report": f"{stem}-report"}


def _value(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if name in PERCENT_METRICS else f"{value:,.0f}"


def _delta(name: str, value: float | None) -> str:
    if value is None:
        return ""
    return f"{value * 100:+.1f} pp" if name in PERCENT_METRICS else f"{value:+,.0f}"


def _cell(text: Any) -> str:
    """A markdown table cell: pipes escaped, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(change: SeriesChange, record: RunRecord, outcome: GateOutcome | None, report: Path | None) -> str:
    """The run's summary artifact."""
    counts = change.findings["severity"].value_counts()
    verdict = (f"{len(change.findings)} findings: " + ", ".join(f"{counts[s]} {s}" for s in SEVERITY_ORDER if s in counts)
               if len(change.findings) else "No findings")
    lines = [f"# visaudit audit {change.run_id}", "",
             f"**Model** {_cell(record.model.name or 'unnamed')} · **data** {_cell(record.data.source or '')}", "",
             f"**Verdict:** {verdict}"]
    if outcome is not None:
        lines.append(f"**Release gate:** {_cell(outcome.summary)}")
    since = f"change since {change.previous}" if change.previous else "change (first run of the series)"
    lines += ["", f"| metric | this run | {since} |", "| --- | --- | --- |"]
    lines += [f"| {name} | {_value(name, change.headline[name])} | {_delta(name, change.deltas[name])} |"
              for name in change.headline]
    lines += ["", "## Findings by severity", ""]
    for severity in SEVERITY_ORDER:
        rows = change.findings[change.findings["severity"] == severity]
        lines.append(f"- **{severity}** ({len(rows)})" + (": " if len(rows) else ""))
        lines += [f"  - {row.kind}" + (f" on {_cell(row.class_name or row.slice)}" if (row.class_name or row.slice)
                                        else "") + f": {row.metric} = {row.value:.3g} (threshold {row.threshold:.3g})"
                  for row in rows.itertuples()]
    if change.previous:
        lines += ["", f"## New since {change.previous}", ""]
        lines += [f"- {f.kind}" + (f" on {_cell(f.subject)}" if f.subject else "") + f" ({f.severity_b})"
                  for f in change.new_findings] or ["- nothing new"]
        lines += [f"- accuracy{' of ' + _cell(d.class_name) if d.class_name else ''} fell "
                  f"{-d.change.change * 100:.1f} pp (95% interval {d.change.low * 100:+.1f} to "
                  f"{d.change.high * 100:+.1f} pp, McNemar p = {d.change.p_value:.3g})" for d in change.drops]
    if report is not None:
        lines += ["", f"Report: `{report}`"]
    return "\n".join(lines) + "\n"


def findings_table(change: SeriesChange) -> list[dict[str, Any]]:
    """The table artifact's rows: one per finding."""
    return [{"severity": row.severity, "kind": row.kind, "class": row.class_name or "", "slice": row.slice or "",
             "metric": row.metric, "value": None if row.value != row.value else round(float(row.value), 4),
             "threshold": None if row.threshold != row.threshold else round(float(row.threshold), 4),
             "evidence": len(row.evidence) if row.evidence is not None else 0, "message": row.message}
            for row in change.findings.itertuples()]


def event_payloads(change: SeriesChange, outcome: GateOutcome | None, report: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(event name, payload) of every event the run emits, the completion first."""
    base = {"run_id": change.run_id, "series": change.series, "previous_run": change.previous}
    events = [(COMPLETED, base | {
        "headline": change.headline, "change": change.deltas,
        "gate": None if outcome is None else {"passed": outcome.passed, "summary": outcome.summary},
        "report": None if report is None else str(report)})]
    events += [(FINDING_NEW, base | {"kind": f.kind, "subject": f.subject, "severity": f.severity_b,
                                     "value": f.value_b, "message": f.message}) for f in change.new_findings]
    events += [(METRIC_DROPPED, base | {
        "metric": "accuracy" if d.class_name is None else "class_accuracy", "class_name": d.class_name,
        "before": d.change.accuracy_a, "after": d.change.accuracy_b, "change": d.change.change,
        "low": d.change.low, "high": d.change.high, "p_value": d.change.p_value, "images": d.change.images})
        for d in change.drops]
    return events


def publish(out_dir: str, run_id: str, drop_margin: float, outcome: GateOutcome | None) -> int:
    """Create the run's artifacts and emit its events (inside a flow run: they attach to it);
    returns how many events."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    run_dir = Path(out_dir) / "runs" / run_id
    record = RunRecord.load(run_dir)
    change = series_change(Path(out_dir), run_id, drop_margin)
    report = next((run_dir / name for name in ("report.pdf", "report.html") if (run_dir / name).is_file()), None)
    keys = artifact_keys(change.series)
    description = f"visaudit run {run_id} of {record.model.name or 'the model'} on {record.data.source}"
    create_markdown_artifact(summary_markdown(change, record, outcome, report), key=keys["summary"],
                             description=description)
    create_table_artifact(findings_table(change), key=keys["findings"], description=f"Findings of {run_id}")
    if report is not None:
        create_link_artifact(report.resolve().as_uri(), link_text=f"{report.name} of {run_id}", key=keys["report"],
                             description=description)
    resource = {"prefect.resource.id": f"visaudit.series.{series_digest(change.series)}",
                "prefect.resource.name": f"{record.model.name or 'model'} on {record.data.source or 'data'}"}
    related = [{"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.role": "flow-run"}] \
        if flow_run.id else None
    events = event_payloads(change, outcome, report)
    for event, payload in events:
        emit_event(event, resource=resource, related=related, payload=payload)
    return len(events)
