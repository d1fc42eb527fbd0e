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

from visaudit.tasks.data.columns import flat_items, image_positions, rows_where
from visaudit.tasks.data.records import MetricRow
from visaudit.tasks.explain.catalogue import method_kind
from visaudit.tasks.findings.stats import Z_95, wilson_interval

TOP = 5
EMPTY_MAP_KINDS = ("gradient", "cam")  # ReLU-ed maps: a class without positive evidence has an empty map


def _single_labels(labels: pd.Series) -> tuple[pd.Categorical, np.ndarray]:
    """Each row's label when it has exactly one (a null item as "None", as ``str`` writes it),
    else missing, as a categorical: one string a class, not one a row (a million Python strings
    are ~70 MB); and whether each row has a label at all."""
    parents, items = flat_items(labels)
    lengths = np.bincount(parents, minlength=len(labels))
    one = lengths[parents] == 1
    names = pc.dictionary_encode(items.filter(pa.array(one)))
    codes = np.full(len(labels), -1, dtype=np.int64)
    codes[parents[one]] = names.indices.to_numpy(zero_copy_only=False)
    categories = pd.Index(names.dictionary.to_pylist(), dtype=object)
    return pd.Categorical.from_codes(codes, categories=categories), lengths > 0


def _by_class(values: pd.Series, classes: pd.Series) -> list[tuple[str, pd.Series]]:
    """``values`` grouped by ``classes`` (same positions; Arrow or categorical, so no Python
    string a row), missing classes left out, in the classes' name order."""
    keys = pd.Series(classes.array, index=values.index)
    return sorted((str(name), group) for name, group in values.groupby(keys, sort=False, observed=True))


def _rate_rows(metric: str, hits: pd.Series, classes: pd.Series, method: str, layer: str,
               detail: str) -> list[MetricRow]:
    """``metric`` with its Wilson interval, per class and over all, from boolean ``hits``."""
    rows = []
    groups = [(None, hits)] + _by_class(hits, classes)
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


def _top5_hits(maps: pd.DataFrame, top_classes: pd.Series, labelled: np.ndarray, truth: pd.Categorical,
               heatmaps: Callable[[], pd.Series]) -> tuple[np.ndarray, np.ndarray] | None:
    """One hit per (image, top-5 class) pair of the ``labelled`` images (positions into the
    audited rows, whose ``top_classes`` and single label ``truth`` are given in that order), and
    each pair's image position; None when a pair has no map.

    The map counts come first: an image with fewer distinct targets among its maps than
    distinct top classes leaves a pair without a map, and the image with the fewest maps
    settles the usual case (maps of the predicted and true classes only) before any per-image
    list is built. ``maps`` carry ``_pos`` (their image's audited position) and ``_row``
    (their position in the series ``heatmaps`` returns, read only when every pair has its map)."""
    targets = pd.factorize(maps["target"])[0].astype(np.int64)  # (image, target) pairs as one integer each
    width = targets.max(initial=0) + 2
    pairs = np.sort(maps["_pos"].to_numpy(np.int64) * width + targets + 1)  # sorted, not np.unique's hash set
    distinct = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if len(pairs) else pairs
    have = np.bincount(distinct // width, minlength=len(truth))
    fewest = labelled[np.argmin(have[labelled])]
    if have[fewest] < _distinct_top(top_classes.iloc[fewest]):
        return None
    top = top_classes.iloc[labelled].map(lambda c: list(c)[:TOP])
    counts = top.map(len).to_numpy()
    if (have[labelled] < top.map(_distinct_top).to_numpy()).any() or (counts == 0).any():  # no top class: no pairs
        return None
    pairs = pd.DataFrame({"_pos": np.repeat(labelled, counts),
                          "target": pd.Series(top.explode().to_numpy(), dtype=maps["target"].dtype)})
    found = pairs.merge(maps[["_pos", "target", "pointing_hit", "_row"]], on=["_pos", "target"], how="left")
    if found["_row"].isna().any():
        return None
    cells = heatmaps().iloc[found["_row"].to_numpy(np.int64)]
    image = found["_pos"].to_numpy(np.int64)
    present = found["target"].to_numpy(object) == np.asarray(truth[image], dtype=object)
    empty = cells.map(lambda h: float(np.max(h)) <= 0.0).to_numpy(bool)
    return np.where(present, found["pointing_hit"].fillna(False).astype(bool).to_numpy(), empty), image


def _covers(positions: pd.Series, required: np.ndarray, images: int) -> bool:
    """Whether the image ``positions`` (of some maps) include every one of ``required``, which
    must not be empty; positions, not ids: a million string ids cost ~200 MB as a pandas index."""
    present = np.zeros(images, dtype=bool)
    present[positions.to_numpy(np.int64)] = True
    return len(required) > 0 and bool(present[required].all())


def localisation_metric_rows(predictions: pd.DataFrame, explanations: pd.DataFrame, multi_label: bool,
                             heatmaps: Callable[[], pd.Series] | None = None) -> list[MetricRow]:
    """Pointing-game, top-5 pointing-game and WSL rows of a run's staged tables.

    Only the top-5 rate reads the maps themselves: ``heatmaps`` returns the ``heatmap`` column of
    ``explanations`` (same rows, same order) for a caller that left it out of the frame (at a
    million images it is the largest column); it is called only for a method and layer whose maps
    cover every image's top classes. By default the frame's own column."""
    audited = rows_where(predictions, predictions["error"].isna() & predictions["box_x0"].notna())
    if audited.empty or explanations.empty or "localised" not in explanations:
        return []
    truth, has_labels = _single_labels(audited["labels"])  # by audited position, as every lookup below
    position = image_positions(explanations["image_id"], audited["image_id"])
    inside = position >= 0
    used = ["method", "layer", "target", "is_label", "box_area_fraction", "pointing_hit", "localised", "wsl_iou"]
    maps = rows_where(explanations[used], inside).assign(_row=np.flatnonzero(inside), _pos=position[inside])
    labelled_pos = np.flatnonzero(has_labels)
    judged_pos = np.flatnonzero(audited["correct"].notna().to_numpy())
    single = np.flatnonzero(truth.codes >= 0)
    rows: list[MetricRow] = []
    methods = maps[["method", "layer"]].drop_duplicates().sort_values(["method", "layer"])
    for method, layer in methods.itertuples(index=False):  # each one's rows, not copied when it is the only one
        group = rows_where(maps, (maps["method"] == method) & (maps["layer"] == layer))
        pointed = group.loc[group["is_label"] & group["box_area_fraction"].notna(),  # an empty map is a miss
                            ["_pos", "target", "pointing_hit"]]
        if _covers(pointed["_pos"], labelled_pos, len(audited)):
            rows += _rate_rows("pointing_rate", pointed["pointing_hit"].fillna(False).astype(bool),
                               pointed["target"], method, layer,
                               "true class's map; tolerance 15 px at 224 px, scaled to the input")
        judged = group.loc[group["localised"].notna(), ["_pos", "localised", "wsl_iou"]]
        if not _covers(judged["_pos"], judged_pos, len(audited)):
            judged = judged.iloc[:0]
        classes = pd.Series(truth[judged["_pos"].to_numpy(np.int64)], index=judged.index)
        rows += _rate_rows("wsl_error", ~judged["localised"].astype(bool), classes, method, layer,
                           "predicted class's map: top-1 wrong or IoU < 0.5")
        iou = judged["wsl_iou"]
        for name, part in [(None, iou)] + _by_class(iou, classes):
            if len(part):
                rows.append(MetricRow(metric="wsl_mean_iou", value=float(part.mean()), images=len(part),
                                      method=method, layer=layer, class_name=name,
                                      detail="predicted class's map"))
        kind = method_kind(method)
        if not multi_label and len(single) and kind in EMPTY_MAP_KINDS:
            hits = _top5_hits(group, audited["top_classes"], single, truth,
                              heatmaps or (lambda: explanations["heatmap"]))
            if hits is not None:
                hit, image = hits
                rows += _rate_rows("pointing_top5_rate", pd.Series(hit), pd.Series(truth[image]), method, layer,
                                   "top-5 classes' maps: present class's peak in the box, absent class's map empty")
    return rows
