"""The localisation section: per method, layer and class, the pointing game's hit rate (and its
top-5 variant) with the 95% Wilson interval, the weakly supervised localisation's mean IoU
and error, from the run's ``metrics`` rows (:mod:`visaudit.tasks.findings.localisation_rates`),
beside the Grad-CAM paper's figures."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from visaudit.tasks.explain.catalogue import method_title
from visaudit.tasks.report.formatting import score

# Grad-CAM paper (Selvaraju et al. 2017), as the seeds quote it: top-5 pointing game on PASCAL VOC 2007.
PAPER_POINTING_TOP5 = (("Grad-CAM", "70.58%"), ("c-MWP", "60.30%"))
_METRICS = ("pointing_rate", "pointing_top5_rate", "wsl_error", "wsl_mean_iou")


@dataclass(frozen=True)
class LocalisationRow:
    """One (method, layer, class) line; ``class_name`` "all classes" for the overall one."""

    method: str
    layer: str
    class_name: str
    maps: int
    pointing: str
    pointing_top5: str
    mean_iou: str
    wsl_error: str


@dataclass(frozen=True)
class LocalisationView:
    rows: list[LocalisationRow]
    top5: bool  # whether the run explained the top-5 classes (--targets top5)
    paper_top5: list[tuple[str, str]]


def _rate(values: pd.Series, metric: str) -> str:
    """``0.71 (0.62-0.79)``: the rate and its interval, or "n/a"."""
    if metric not in values or pd.isna(values[metric]):
        return "n/a"
    return f"{score(values[metric])} ({score(values[metric + '_low'])}-{score(values[metric + '_high'])})"


def localisation_view(metrics: pd.DataFrame) -> LocalisationView | None:
    """The section's table; None when the run has no localisation rows (no boxes)."""
    rows = metrics[metrics["metric"].str.replace(r"_(low|high)$", "", regex=True).isin(_METRICS)]
    if rows.empty:
        return None
    rows = rows.assign(class_name=rows["class_name"].fillna(""))
    lines = []
    for (method, layer, name), group in rows.groupby(["method", "layer", "class_name"], sort=True):
        values = group.set_index("metric")["value"]
        maps = group.set_index("metric")["images"]
        lines.append(LocalisationRow(
            method=method_title(str(method)), layer=str(layer), class_name=str(name) or "all classes",
            maps=int(maps.get("pointing_rate", maps.max())),
            pointing=_rate(values, "pointing_rate"), pointing_top5=_rate(values, "pointing_top5_rate"),
            mean_iou=score(values["wsl_mean_iou"]) if "wsl_mean_iou" in values else "n/a",
            wsl_error=_rate(values, "wsl_error"),
        ))
    lines.sort(key=lambda r: (r.method, r.layer, r.class_name != "all classes", r.class_name))
    return LocalisationView(rows=lines, top5=bool((rows["metric"] == "pointing_top5_rate").any()),
                            paper_top5=list(PAPER_POINTING_TOP5))
