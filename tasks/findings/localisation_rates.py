"""Localisation rates per method, layer and class, as ``metrics`` rows.

From the ``explanations`` rows of audited images with a box (the columns of
:mod:`visaudit.tasks.explain.localisation` and :func:`visaudit.tasks.explain.cam.score_maps`):

- **pointing game** (Zhang et al. 2016): over the maps of each image's true class,
  ``pointing_rate = hits / (hits + misses)``, a hit when the map's maximum lies within the
  tolerance (15 px at 224 px, scaled to the input) of the box (an empty map is a miss);
- **top-5 pointing game** (Grad-CAM paper, sec. 4.3 of its localisation experiments): the maps
  of each image's five top predicted classes, a present class (the image's label) hits when
  its maximum is in the box, an absent class hits when its map is rejected: it is empty
  (every value 0, the Grad-CAM of a class with no positive evidence; the paper rejects maps
  whose maximum is below a threshold, here 0). Needs maps for the top-5 classes:
  ``--targets top5`` (skipped otherwise); multi-class runs only; only for the ReLU-ed CAM
  methods (kinds ``gradient`` and ``cam``): a map that is never empty (patch probabilities,
  attention, guided saliency) could not reject an absent class, capping the rate near 1/5;
- **WSL localisation error** (ILSVRC): over the maps of each image's predicted class,
  ``wsl_error = 1 - localised / maps`` (localised: top-1 right and IoU >= 0.5; an empty map
  has IoU 0), and
  ``wsl_mean_iou`` over the same maps.

A rate is written only over every image it is defined on: ``pointing_rate`` when every
labelled image has its true class's map (``--targets`` with ``true``), ``wsl_error`` and
``wsl_mean_iou`` when every judged image has its predicted class's map (``predicted``);
otherwise the misclassified images would silently leave the denominator.

Each rate has its 95% Wilson score interval (``<metric>_low``, ``<metric>_high``); rows per
true class (``class_name``) and over all classes (``class_name`` null).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from visaudit.tasks.data.columns import is_in
from visaudit.tasks.data.records import MetricRow
from visaudit.tasks.explain.catalogue import method_kind
from visaudit.tasks.findings.stats import Z_95, wilson_interval

TOP = 5
EMPTY_MAP_KINDS = ("gradient", "cam")  # ReLU-ed maps: a class without positive evidence has an empty map


def _first_label(cell: object) -> str | None:
    values = list(cell) if cell is not None and not isinstance(cell, float) else []
    return str(values[0]) if len(values) == 1 else None


def _rate_rows(metric: str, hits: pd.Series, classes: pd.Series, method: str, layer: str,
               detail: str) -> list[MetricRow]:
    """``metric`` with its Wilson interval, per class and over all, from boolean ``hits``."""
    rows = []
    groups = [(None, hits)] + [(str(name), group) for name, group in hits.groupby(classes.to_numpy(), sort=True)]
    for name, group in groups:
        n, k = len(group), int(group.sum())
        if n == 0:
            continue
        low, high = wilson_interval(np.float64(k), np.float64(n), Z_95)
        for suffix, value in (("", k / n), ("_low", float(low)), ("_high", float(high))):
            rows.append(MetricRow(metric=metric + suffix, value=value, images=n, method=method, layer=layer,
                                  class_name=name, detail=detail))
    return rows


def _distinct_top(classes: object) -> int:
    """How many distinct classes a ``top_classes`` cell holds among its first TOP."""
    return len(set(list(classes)[:TOP]))


def _top5_hits(maps: pd.DataFrame, audited: pd.DataFrame, labels: pd.Series,
               heatmaps: Callable[[], pd.Series]) -> pd.Series | None:
    """One hit per (image, top-5 class) pair of the images of ``labels`` (their single label,
    by image id), indexed by image; None when a pair has no map.

    The map counts come first: an image with fewer distinct targets among its maps than
    distinct top classes leaves a pair without a map, and the image with the fewest maps
    settles the usual case (maps of the predicted and true classes only) before any per-image
    list is built. ``maps`` carry ``_row``, their positions in the series ``heatmaps`` returns,
    which is read only when every pair has its map."""
    have = maps.drop_duplicates(["image_id", "target"])["image_id"].value_counts()
    have = have.reindex(labels.index.unique(), fill_value=0)
    fewest = have.idxmin()
    if have[fewest] < _distinct_top(audited.loc[audited["image_id"] == fewest, "top_classes"].iloc[0]):
        return None
    top = audited.set_index("image_id").loc[labels.index, "top_classes"].map(lambda c: list(c)[:TOP])
    if (have.loc[top.index].to_numpy() < top.map(_distinct_top).to_numpy()).any():
        return None
    pairs = top.explode().rename("target").reset_index()
    found = pairs.merge(maps, on=["image_id", "target"], how="left")
    if found["_row"].isna().any():
        return None
    cells = heatmaps().iloc[found["_row"].to_numpy(np.int64)]
    present = found["target"].to_numpy() == labels.loc[found["image_id"]].to_numpy()
    empty = cells.map(lambda h: float(np.max(h)) <= 0.0).to_numpy(bool)
    hit = np.where(present, found["pointing_hit"].fillna(False).astype(bool).to_numpy(), empty)
    return pd.Series(hit, index=found["image_id"].to_numpy())


def localisation_metric_rows(predictions: pd.DataFrame, explanations: pd.DataFrame, multi_label: bool,
                             heatmaps: Callable[[], pd.Series] | None = None) -> list[MetricRow]:
    """Pointing-game, top-5 pointing-game and WSL rows of a run's staged tables.

    Only the top-5 rate reads the maps themselves: ``heatmaps`` returns the ``heatmap`` column of
    ``explanations`` (same rows, same order) for a caller that left it out of the frame (at a
    million images it is the largest column); it is called only for a method and layer whose maps
    cover every image's top classes. By default the frame's own column."""
    audited = predictions[predictions["error"].isna() & predictions["box_x0"].notna()]
    if audited.empty or explanations.empty or "localised" not in explanations:
        return []
    truth = audited.set_index("image_id")["labels"].map(_first_label)
    ids = pa.array(audited["image_id"])  # pyarrow's membership test: pandas' isin on its str dtype is ~20x slower
    inside = pc.is_in(pa.array(explanations["image_id"]), value_set=ids).to_numpy(zero_copy_only=False)
    maps = explanations[inside].assign(_row=np.flatnonzero(inside))
    has_labels = audited["labels"].map(lambda c: c is not None and len(c) > 0)
    labelled_ids = audited.loc[has_labels, "image_id"]  # Arrow's membership tests below: no Python string per id
    judged_ids = audited.loc[audited["correct"].notna(), "image_id"]
    labelled = truth.dropna()
    rows: list[MetricRow] = []
    for (method, layer), group in maps.groupby(["method", "layer"], sort=True):
        pointed = group[group["is_label"] & group["box_area_fraction"].notna()]  # an empty map is a miss
        if len(labelled_ids) and is_in(labelled_ids, pointed["image_id"]).all():
            rows += _rate_rows("pointing_rate", pointed["pointing_hit"].fillna(False).astype(bool),
                               pointed["target"], method, layer,
                               "true class's map; tolerance 15 px at 224 px, scaled to the input")
        judged = group[group["localised"].notna()]
        if not len(judged_ids) or not is_in(judged_ids, judged["image_id"]).all():
            judged = judged.iloc[:0]
        classes = truth.loc[judged["image_id"]].set_axis(judged.index)
        rows += _rate_rows("wsl_error", ~judged["localised"].astype(bool), classes, method, layer,
                           "predicted class's map: top-1 wrong or IoU < 0.5")
        for name, part in [(None, judged)] + list(judged.groupby(classes.to_numpy(), sort=True)):
            if len(part):
                rows.append(MetricRow(metric="wsl_mean_iou", value=float(part["wsl_iou"].mean()), images=len(part),
                                      method=method, layer=layer, class_name=name,
                                      detail="predicted class's map"))
        kind = method_kind(method)
        if not multi_label and len(labelled) and kind in EMPTY_MAP_KINDS:
            hits = _top5_hits(group[["image_id", "target", "pointing_hit", "_row"]], audited, labelled,
                              heatmaps or (lambda: explanations["heatmap"]))
            if hits is not None:
                rows += _rate_rows("pointing_top5_rate", hits.reset_index(drop=True),
                                   labelled.loc[hits.index].reset_index(drop=True), method, layer,
                                   "top-5 classes' maps: present class's peak in the box, absent class's map empty")
    return rows
