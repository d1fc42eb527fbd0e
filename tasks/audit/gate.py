"""The release gate: a policy over a committed run's findings and headline numbers.

A policy (``--fail-on SEVERITY``, or a TOML file given with ``--policy``) names what breaks a
release: findings at or above a severity (of some kinds only, if it says so), and floors or
ceilings on the run's numbers. The gate is judged after the run is committed, so its tables
are readable whatever the outcome; the outcome is written beside ``run.json`` as
``gate.json`` (the report's cover shows it) and a broken policy ends the run with
:class:`GateFailed`, whose message is the one-line summary (the command line exits with
:data:`GATE_EXIT_CODE`).

The numbers a policy can bound (all from the ``predictions`` table, as on the cover):

- ``accuracy``, ``top5_accuracy``, ``ece`` (see ``findings.metrics``);
- ``worst_class``: the lowest per-class accuracy (over each true class's images);
- ``worst_group``: the lowest accuracy over the groups of a manifest attribute value
  (``background=blue``...) holding at least ``min_group_images`` judged images.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.data import storage
from visaudit.tasks.data.files import write_atomically
from visaudit.tasks.data.sources import attribute_pairs
from visaudit.tasks.findings.metrics import judged_rows, summary_metrics
from visaudit.tasks.findings.registry import KIND_RANK
from visaudit.tasks.findings.thresholds import SEVERITY_ORDER

GATE_EXIT_CODE = 3  # `visaudit run` exits with this when the policy is broken (2 is bad input)
GATE_NAME = "gate.json"
GATE_METRICS = ("accuracy", "top5_accuracy", "ece", "worst_class", "worst_group")
MEASURED_COLUMNS = ["error", "correct", "labels", "top_classes", "confidence", "attributes"]  # what ``measure`` reads
Severity = Literal["high", "medium", "low"]


class GateFailed(RuntimeError):
    """The run broke its release policy; the message is the one-line summary."""


class GatePolicy(BaseModel):
    """What fails a release. Empty (no rule) passes everything."""

    model_config = ConfigDict(extra="forbid")

    fail_on: Severity | None = Field(None, description="Findings at this severity or above fail the gate.")
    kinds: list[str] = Field(default_factory=list, description="Only findings of these kinds count (default all).")
    floors: dict[str, float] = Field(default_factory=dict, description="Numbers that must be at least this.")
    ceilings: dict[str, float] = Field(default_factory=dict, description="Numbers that must be at most this.")
    min_group_images: int = Field(10, ge=1, description="Smallest attribute group ``worst_group`` considers.")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        if bad := [kind for kind in kinds if kind not in KIND_RANK]:
            raise ValueError(f"unknown finding kind(s) {bad}; known: {', '.join(KIND_RANK)}")
        return kinds

    @field_validator("floors", "ceilings")
    @classmethod
    def _known_metrics(cls, bounds: dict[str, float]) -> dict[str, float]:
        if bad := [name for name in bounds if name not in GATE_METRICS]:
            raise ValueError(f"unknown metric(s) {bad}; a policy can bound {', '.join(GATE_METRICS)}")
        if bad := [name for name, value in bounds.items() if not math.isfinite(value)]:
            raise ValueError(f"{bad}: bounds must be finite numbers")
        return bounds

    @property
    def empty(self) -> bool:
        return self.fail_on is None and not self.floors and not self.ceilings

    def describe(self) -> str:
        """The policy in one line, e.g. 'fail on high findings; accuracy >= 0.9'."""
        parts = []
        if self.fail_on:
            kinds = f" of kind {', '.join(self.kinds)}" if self.kinds else ""
            parts.append(f"fail on {self.fail_on}{'' if self.fail_on == 'high' else ' or higher'} findings{kinds}")
        parts += [f"{name} >= {value:g}" for name, value in self.floors.items()]
        parts += [f"{name} <= {value:g}" for name, value in self.ceilings.items()]
        return "; ".join(parts) or "no rule"


def load_policy(path: Path) -> GatePolicy:
    """A policy TOML file (keys as :class:`GatePolicy`'s); a ValueError names the file and what is wrong."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the policy ({exc}); see the README's release gate") from None
    try:
        return GatePolicy.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'policy'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise ValueError(f"{path}: {problems}") from None


class GateOutcome(BaseModel):
    """The gate's verdict on one run: the policy, what was measured, and why it failed."""

    policy: str
    passed: bool
    reasons: list[str]
    measured: dict[str, float | None]
    worst_group_name: str | None = None

    @property
    def summary(self) -> str:
        """The one-line summary printed by the command line and carried by a failed flow run."""
        if self.passed:
            return f"release gate passed ({self.policy})"
        return f"release gate FAILED: {'; '.join(self.reasons)}"

    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / GATE_NAME
        write_atomically(path, lambda tmp: tmp.write_text(self.model_dump_json(indent=2), encoding="utf-8"))
        return path

    @classmethod
    def load(cls, run_dir: Path) -> GateOutcome | None:
        """The run's outcome, or None when it ran without a policy."""
        path = Path(run_dir) / GATE_NAME
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def worst_group(predictions: pd.DataFrame, min_images: int) -> tuple[str | None, float | None]:
    """The attribute group (``name=value``) of lowest accuracy among those with at least
    ``min_images`` judged images, and that accuracy; (None, None) when there is none."""
    judged = judged_rows(predictions)
    pairs = [(f"{key}={value}", bool(ok)) for cell, ok in zip(judged["attributes"], judged["correct"])
             for key, value in attribute_pairs(cell)]
    if not pairs:
        return None, None
    frame = pd.DataFrame(pairs, columns=["group", "correct"])
    stats = frame.groupby("group")["correct"].agg(["mean", "size"])
    stats = stats[stats["size"] >= min_images]
    if stats.empty:
        return None, None
    name = str(stats["mean"].idxmin())
    return name, float(stats.loc[name, "mean"])


def measure(predictions: pd.DataFrame, multi_label: bool, min_group_images: int) -> tuple[dict[str, float | None],
                                                                                          str | None]:
    """The numbers a policy can bound, for one run's ``predictions``, and the worst group's name."""
    summary = summary_metrics(predictions, multi_label)
    group, group_accuracy = worst_group(predictions, min_group_images)
    values = {"accuracy": summary.accuracy, "top5_accuracy": summary.top5_accuracy, "ece": summary.ece,
              "worst_class": summary.class_accuracy_min, "worst_group": group_accuracy}
    return values, group


def judge(policy: GatePolicy, findings: pd.DataFrame, predictions: pd.DataFrame, multi_label: bool) -> GateOutcome:
    """Judge one run against ``policy``. A bounded number that could not be measured (no
    labels, no attribute group big enough) fails the gate: a release is not let through on
    a number nobody saw."""
    reasons = []
    if policy.fail_on is not None:
        limit = SEVERITY_ORDER[policy.fail_on]
        rank = findings["severity"].map(SEVERITY_ORDER)
        hits = findings[rank.notna() & (rank <= limit)]
        if policy.kinds:
            hits = hits[hits["kind"].isin(policy.kinds)]
        if len(hits):
            subjects = [f"{row.kind}" + (f" on {subject}" if (subject := finding_subject(row.class_name, row.slice))
                                         else "") for row in hits.itertuples()]
            shown = ", ".join(subjects[:3]) + (f" and {len(subjects) - 3} more" if len(subjects) > 3 else "")
            level = policy.fail_on if policy.fail_on == "high" else f"{policy.fail_on} or higher"
            reasons.append(f"{len(hits)} {level} finding{'s' if len(hits) != 1 else ''} ({shown})")
    measured, group = measure(predictions, multi_label, policy.min_group_images)
    for name, bound, broken, sign in ([(n, v, lambda x, b: x < b, "<") for n, v in policy.floors.items()]
                                      + [(n, v, lambda x, b: x > b, ">") for n, v in policy.ceilings.items()]):
        value = measured[name]
        where = f" ({group})" if name == "worst_group" and group else ""
        if value is None:
            reasons.append(f"{name} not measured in this run (bound {bound:g})")
        elif broken(value, bound):
            reasons.append(f"{name} {value:.3f}{where} {sign} {bound:g}")
    return GateOutcome(policy=policy.describe(), passed=not reasons, reasons=reasons, measured=measured,
                       worst_group_name=group)


def judge_run(out_dir: str, run_id: str, policy: GatePolicy | None) -> GateOutcome | None:
    """Judge a committed run by ``policy`` and write its ``gate.json``; None (and no file) without a policy."""
    if policy is None:
        return None
    run_dir = Path(out_dir) / "runs" / run_id
    record = RunRecord.load(run_dir)
    findings = storage.read_table(Path(out_dir), "findings", run_id)
    predictions = storage.read_table(Path(out_dir), "predictions", run_id, columns=MEASURED_COLUMNS)
    outcome = judge(policy, findings, predictions, record.multi_label)
    outcome.save(run_dir)
    return outcome


def finding_subject(class_name: object, slice_text: object) -> str:
    """What a finding is about: its class, else its slice, else '' (a run-wide finding)."""
    for value in (class_name, slice_text):
        if isinstance(value, str) and value:
            return value
    return ""
