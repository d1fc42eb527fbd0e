"""What the report reads: a committed run's tables, its ``run.json`` and its feature-view index.

Nothing else: ``visaudit report RUN`` can re-render a run at any time from these alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.data.storage import read_table
from visaudit.tasks.explain.features import FEATURES_DIR, INDEX_NAME
from visaudit.tasks.report.formatting import names


@dataclass(frozen=True)
class RunInputs:
    """One run's record and tables (``history``: the ``metrics`` rows of every run, for trends)."""

    run_id: str
    run_dir: Path
    record: RunRecord
    predictions: pd.DataFrame
    findings: pd.DataFrame
    explanations: pd.DataFrame
    occlusion: pd.DataFrame
    impressions: pd.DataFrame
    adversarial: pd.DataFrame
    history: pd.DataFrame
    features: dict[str, Any] | None

    @property
    def metrics(self) -> pd.DataFrame:
        """This run's ``metrics`` rows."""
        return self.history[self.history["run_id"] == self.run_id]

    @property
    def classes(self) -> list[str]:
        """The run's classes: run.json's list, else the names the tables use."""
        return list(self.record.classes) or classes_seen(self.predictions)


def read_inputs(out_dir: Path, run_id: str) -> RunInputs:
    """Read ``runs/<run_id>/run.json`` (a clear error when the run was never committed), then its tables."""
    run_dir = Path(out_dir) / "runs" / run_id
    record = RunRecord.load(run_dir)
    return RunInputs(
        run_id=run_id,
        run_dir=run_dir,
        record=record,
        predictions=read_table(out_dir, "predictions", run_id),
        findings=read_table(out_dir, "findings", run_id),
        explanations=read_table(out_dir, "explanations", run_id),
        occlusion=read_table(out_dir, "occlusion", run_id),
        impressions=read_table(out_dir, "impressions", run_id),
        adversarial=read_table(out_dir, "adversarial", run_id),
        history=read_table(out_dir, "metrics"),
        features=read_features(run_dir),
    )


def read_features(run_dir: Path) -> dict[str, Any] | None:
    """The feature views' index (``features/features.json``), or None when none were drawn."""
    path = run_dir / FEATURES_DIR / INDEX_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def classes_seen(predictions: pd.DataFrame) -> list[str]:
    """Class names from the tables, for a run.json without a class list."""
    return sorted({name for column in ("labels", "predicted") for cell in predictions[column] for name in names(cell)})
