"""The findings entry point: :func:`compute_findings` runs every registered detector over a
run's tables (:class:`FindingInputs`) and returns the ``findings`` table, most severe first.

Every finding carries the number that raised it (``metric``, ``value``), the ``threshold``
it crossed, a plain-words ``message`` (what was seen, why it matters, what to try) and
``evidence``: the image ids that show it, most telling first. The detectors and their
order are in ``registry``; their thresholds in ``thresholds``.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from visaudit.tasks.data.memory import release_freed
from visaudit.tasks.data.schema import table_schema
from visaudit.tasks.findings.causes import link_causes
from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.inputs import AuditTables, FindingInputs, sharing
from visaudit.tasks.findings.registry import DETECTORS, KIND_RANK, MAP_BASED
from visaudit.tasks.findings.thresholds import SEVERITY_ORDER, Thresholds

__all__ = ["Finding", "FindingInputs", "Thresholds", "compute_findings", "detect_all"]


def _applies(detector: Detector, tables: AuditTables) -> bool:
    """Whether ``detector`` runs on these tables: its inputs present, multi-label if it allows."""
    return (detector.multi_label or not tables.multi_label) and all(tables.has(name) for name in detector.needs)


def mark_low_confidence(found: list[Finding]) -> list[Finding]:
    """Map-based findings on a class whose maps are undermined (or on every class, when a
    finding undermines all maps) get confidence "low" and the reason in the message."""
    reasons = {f.class_name: f.undermines_maps for f in found if f.undermines_maps}
    marked = []
    for f in found:
        reason = (reasons.get(f.class_name) or reasons.get(None)) if f.kind in MAP_BASED else None
        marked.append(replace(f, confidence="low", message=f"{f.message} Low confidence: {reason}.") if reason else f)
    return marked


def detect_all(inputs: FindingInputs, thresholds: Thresholds) -> list[Finding]:
    """Every applicable detector's findings, confidence marked, same-cause findings linked
    (``causes``), most severe first (within a severity in registry order, each detector's own
    order kept). Detectors share what they derive alike (``inputs.shared``) within the run."""
    tables = inputs.tables()
    found: list[Finding] = []
    with sharing():
        for detector in (d for d in DETECTORS if _applies(d, tables)):
            found.extend(detector.detect(tables, thresholds))
            release_freed()  # each detector's working set, freed, back to the system before the next
    found = link_causes(mark_low_confidence(found), DETECTORS)
    return sorted(found, key=lambda f: (SEVERITY_ORDER[f.severity], KIND_RANK[f.kind]))


def compute_findings(inputs: FindingInputs, thresholds: Thresholds) -> pd.DataFrame:
    """The ``findings`` table of a run: :func:`detect_all` as rows in the table's schema."""
    columns = table_schema("findings").names
    found = detect_all(inputs, thresholds)
    if not found:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})
    return pd.DataFrame([f.to_row() for f in found], columns=columns)
