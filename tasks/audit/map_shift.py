"""How far two runs' explanations moved on the images both got right.

The Grad-CAM paper's trust experiment shows reviewers the explanations of two models that
make the same predictions; here the comparison is measured: for every image right in both
runs, the maps of its (predicted = true) class are matched on ``image_id``, ``method``,
``layer`` and ``target`` and compared by Spearman's rank correlation over the map's cells
(ties averaged)::

    rho = corr(rank(L_a), rank(L_b))

1 means the same ordering of evidence, about 0 unrelated maps. Maps of different sizes (two
architectures whose layers share a name) cannot be compared cell by cell and are counted,
not guessed at; a constant map has no ordering and gives NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from visaudit.tasks.data.columns import is_in

MAP_KEYS = ["image_id", "method", "layer", "target"]
MAP_COLUMNS = [*MAP_KEYS, "height", "width", "heatmap", "is_predicted"]
MOVED_BELOW = 0.5  # a map whose correlation with the other run's is below this "moved"


@dataclass(frozen=True)
class ShiftSummary:
    """One method and layer: how many images were compared and how their maps moved."""

    method: str
    layer: str
    images: int
    median: float
    moved: int  # images with rho < MOVED_BELOW
    unmatched: int  # images right in both whose maps differ in size


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between the rows of ``a`` and ``b`` (N, cells); NaN for a constant row."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(axis=1) / denominator, np.nan)


def map_shift(maps_a: pd.DataFrame, maps_b: pd.DataFrame, both_right: list[str]) -> tuple[pd.DataFrame,
                                                                                         list[ShiftSummary]]:
    """Per image, method and layer, rho between the runs' maps of the predicted class, on
    the images right in both (``both_right``); and a summary per method and layer."""
    keep = set(both_right)

    def predicted(maps: pd.DataFrame) -> pd.DataFrame:
        rows = maps[maps["is_predicted"].to_numpy() & is_in(maps["image_id"], keep)]
        return rows[MAP_COLUMNS].drop_duplicates(MAP_KEYS)

    pairs = predicted(maps_a).merge(predicted(maps_b), on=MAP_KEYS, suffixes=("_a", "_b"))
    same = (pairs["height_a"] == pairs["height_b"]) & (pairs["width_a"] == pairs["width_b"])
    unmatched = pairs[~same].groupby(["method", "layer"]).size()
    pairs = pairs[same].reset_index(drop=True)
    rho = np.full(len(pairs), np.nan)
    for _, group in pairs.groupby(["height_a", "width_a"]).groups.items():
        index = np.asarray(group)
        a = np.stack(pairs.loc[index, "heatmap_a"].map(np.asarray)).astype(np.float64)
        b = np.stack(pairs.loc[index, "heatmap_b"].map(np.asarray)).astype(np.float64)
        rho[index] = rowwise_spearman(a, b)
    shifts = pairs[MAP_KEYS].assign(spearman=rho).sort_values("spearman", kind="stable", na_position="last")
    summaries = []
    for (method, layer), rows in shifts.groupby(["method", "layer"], sort=True):
        values = rows["spearman"].dropna()
        summaries.append(ShiftSummary(method=str(method), layer=str(layer), images=int(len(values)),
                                      median=float(values.median()) if len(values) else float("nan"),
                                      moved=int((values < MOVED_BELOW).sum()),
                                      unmatched=int(unmatched.get((method, layer), 0))))
    return shifts.reset_index(drop=True), summaries
