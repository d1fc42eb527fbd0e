"""What the report reads: a committed run's tables, its ``run.json`` and its feature-view index.

Nothing else: ``visaudit report RUN`` can re-render a run at any time from these alone. Of the
tables that grow with the images, it reads at once only the ``predictions`` columns the report
uses (:data:`PREDICTION_COLUMNS`, list and map columns as Arrow data, no Python object per
cell); a section reads more (the shown images' maps, the Grad-CAM peaks) with
:meth:`RunInputs.read`, only what it shows, so the report's memory and time do not grow with
every column of a million images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.compute as pc

from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.data.columns import flat_items, object_cells
from visaudit.tasks.data.storage import read_table
from visaudit.tasks.explain.feature_index import read_features

# what the report reads of every image: the run-wide sections (headline numbers, ``summary_metrics``
# included, class table, confusion matrix, calibration, slices, failure gallery) and the shown images
PREDICTION_COLUMNS = ["image_id", "uri", "labels", "predicted", "top_classes", "top_scores", "confidence", "correct",
                      "box_x0", "box_y0", "box_x1", "box_y1", "error", "attributes"]
NESTED_COLUMNS = ["labels", "predicted", "top_classes", "top_scores", "attributes"]
OCCLUSION_COLUMNS = ["target", "is_predicted", "gradcam_spearman", "window", "stride", "baseline"]  # faithfulness


@dataclass(frozen=True)
class RunInputs:
    """One run's record and tables (``predictions``: :data:`PREDICTION_COLUMNS` only, its list
    and map columns as Arrow data, see :mod:`~visaudit.tasks.data.columns`; ``occlusion``: :data:`OCCLUSION_COLUMNS` only; ``history``: the ``metrics`` rows of every
    run, for trends)."""

    out_dir: Path
    run_id: str
    run_dir: Path
    record: RunRecord
    predictions: pd.DataFrame
    findings: pd.DataFrame
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

    def rows(self, image_ids: Iterable[str]) -> pd.DataFrame:
        """The ``predictions`` rows of ``image_ids`` (in table order) with their cells as
        ``read_table`` gives them by default (arrays, lists of pairs), for the shown images."""
        picked = self.predictions[self.predictions["image_id"].isin(set(image_ids))]
        return picked.assign(**{name: object_cells(picked[name]) for name in NESTED_COLUMNS})

    def read(self, table: str, columns: list[str] | None = None, image_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """More of this run's ``table``: only ``columns`` and the rows of ``image_ids`` when given."""
        return read_table(self.out_dir, table, self.run_id, columns, image_ids)


def read_inputs(out_dir: Path, run_id: str) -> RunInputs:
    """Read ``runs/<run_id>/run.json`` (a clear error when the run was never committed), then its tables."""
    run_dir = Path(out_dir) / "runs" / run_id
    record = RunRecord.load(run_dir)
    return RunInputs(
        out_dir=Path(out_dir),
        run_id=run_id,
        run_dir=run_dir,
        record=record,
        predictions=read_table(out_dir, "predictions", run_id, columns=PREDICTION_COLUMNS, nested_as_arrow=True),
        findings=read_table(out_dir, "findings", run_id),
        occlusion=read_table(out_dir, "occlusion", run_id, columns=OCCLUSION_COLUMNS),
        impressions=read_table(out_dir, "impressions", run_id),
        adversarial=read_table(out_dir, "adversarial", run_id),
        history=read_table(out_dir, "metrics"),
        features=read_features(run_dir),
    )


def classes_seen(predictions: pd.DataFrame) -> list[str]:
    """Class names from the tables, for a run.json without a class list."""
    return sorted({name for column in ("labels", "predicted")
                   for name in pc.unique(flat_items(predictions[column])[1]).to_pylist()})
