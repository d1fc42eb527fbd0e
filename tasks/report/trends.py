"""The trends section: this run against the earlier runs of the same model on the same source,
from the ``metrics`` table's per-run rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from visaudit.tasks.report.figures import Painter, draw_trends
from visaudit.tasks.report.formatting import percent
from visaudit.tasks.report.overview import SEVERITIES

TREND_METRICS = ("accuracy", "top5_accuracy", "ece", "findings_high", "findings_medium", "findings_low")
TREND_RUNS = 12  # runs shown, the latest


@dataclass(frozen=True)
class TrendRow:
    """One run of the series."""

    run_id: str
    accuracy: str
    ece: str
    findings: str  # 'high / medium / low'
    current: bool


@dataclass(frozen=True)
class TrendsView:
    """The series' figure, the changes since the previous run, and the runs, latest first."""

    src: str
    previous: str
    changes: list[tuple[str, str]]
    rows: list[TrendRow]


def trends_view(history: pd.DataFrame, run_id: str, painter: Painter, limit: int = TREND_RUNS) -> TrendsView | None:
    """The runs of this run's series (the ``detail`` of its accuracy row) up to this one; None
    before the second run. ``history``: the metrics rows of every run."""
    mine = history[(history["run_id"] == run_id) & (history["metric"] == "accuracy")]
    if mine.empty:
        return None
    series = mine["detail"].iloc[0]
    rows = history[(history["detail"] == series) & history["metric"].isin(TREND_METRICS)]
    table = rows.pivot_table(index="run_id", columns="metric", values="value", aggfunc="first", dropna=False)
    table = table.sort_index().loc[:run_id].tail(limit)
    if len(table) < 2:
        return None
    src = painter.save("trends.png", lambda tmp: draw_trends(table, tmp))
    previous, current = table.iloc[-2], table.iloc[-1]

    def change(name: str, scale: float = 100.0, unit: str = " pp") -> str:
        """The change of ``name`` since the previous run (percentage points by default)."""
        delta = current.get(name, np.nan) - previous.get(name, np.nan)
        return "n/a" if pd.isna(delta) else f"{delta * scale:+.{1 if unit else 0}f}{unit}"

    return TrendsView(
        src=src,
        previous=table.index[-2],
        changes=[("Accuracy", change("accuracy")), ("Top-5 accuracy", change("top5_accuracy")),
                 ("ECE", change("ece")), ("High findings", change("findings_high", 1.0, "")),
                 ("All findings", "n/a" if pd.isna(current.get("findings_high")) else
                  f"{findings_total(current) - findings_total(previous):+.0f}")],
        rows=[
            TrendRow(run_id=rid, accuracy=percent(row.get("accuracy")), ece=percent(row.get("ece")),
                     findings=" / ".join(str(int(row.get(f"findings_{s}", 0) or 0)) for s in SEVERITIES),
                     current=rid == run_id)
            for rid, row in table.iloc[::-1].iterrows()
        ],
    )


def findings_total(row: pd.Series) -> float:
    """A run's findings of every severity."""
    return float(sum(row.get(f"findings_{s}", 0) or 0 for s in SEVERITIES))
