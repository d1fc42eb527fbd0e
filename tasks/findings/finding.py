"""The typed records of the findings layer: a :class:`Finding` (one row of the ``findings``
table) and a :class:`Detector` (one registered detector, see ``registry``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from visaudit.tasks.findings.inputs import AuditTables
from visaudit.tasks.findings.thresholds import SEVERITY_ORDER, Thresholds

CONFIDENCES = ("normal", "low")
SUPPORTS = ("intervention", "comparison", "association")  # kinds of evidence, strongest first (see ``causes``)


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One flag of a dataset bias or failure mode, with the number that raised it.

    The fields are the ``findings`` table's columns (``tasks/data/schema.py``), except
    ``undermines_maps``: set by a finding that shows the explanation maps cannot be trusted
    (on ``class_name``, or on every class when that is None), it says why; map-based
    findings there then get ``confidence`` "low" and the reason. It is not stored.
    ``cause``: set by ``causes.link_causes`` when other findings flag the same images: the
    name of the finding whose evidence best explains them (the same on all of them).
    """

    kind: str  # the detector's kind, e.g. "confident_error"
    severity: str  # "high", "medium" or "low"
    class_name: str | None = None  # the class it is about; None for the whole run
    slice: str | None = None  # the subset it is about, "name=value" (a layer, an attribute, a spot)
    metric: str  # what ``value`` measures
    value: float  # the number that raised it
    threshold: float  # the threshold that number crossed
    message: str  # what was seen, why it matters, what to try
    evidence: tuple[str, ...] = ()  # image ids that show it, most telling first
    confidence: str = "normal"  # "low" when the maps it rests on failed a faithfulness check
    cause: str | None = None  # the finding the evidence supports, when several flag the same images
    undermines_maps: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_ORDER:
            raise ValueError(f"severity must be one of {', '.join(SEVERITY_ORDER)}, got {self.severity!r}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {', '.join(CONFIDENCES)}, got {self.confidence!r}")

    def to_row(self) -> dict[str, Any]:
        """The finding as a ``findings`` table row (evidence as a list; ``undermines_maps`` left out)."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "undermines_maps"}
        row["evidence"] = list(self.evidence)
        return row


@dataclass(frozen=True, kw_only=True)
class Detector:
    """A registered detector: what it flags, what it needs and how the findings are ordered.

    ``detect`` computes its findings from the prepared tables. It runs only when every
    input named in ``needs`` (fields of :class:`~visaudit.tasks.findings.inputs.AuditTables`,
    e.g. "signals") is present and not empty, and on multi-label runs only when
    ``multi_label`` is true. ``map_based``: its evidence is the class's explanation maps, so
    an unfaithful-explanation finding lowers its confidence. ``support``: the kind of evidence
    its findings rest on (one of ``SUPPORTS``), which decides the explanation when findings
    of several detectors flag the same images (``causes``); None: never linked (a cause of
    its own). Its rank in the within-severity order is its position in ``registry.DETECTORS``.
    """

    kind: str
    detect: Callable[[AuditTables, Thresholds], list[Finding]]
    needs: tuple[str, ...] = ()
    multi_label: bool = True
    map_based: bool = False
    support: str | None = None

    def __post_init__(self) -> None:
        if self.support is not None and self.support not in SUPPORTS:
            raise ValueError(f"support must be one of {', '.join(SUPPORTS)} or None, got {self.support!r}")
