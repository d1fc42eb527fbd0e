"""Weakly supervised localisation from a saliency map (CAM paper, Zhou et al. 2016, sec. 4;
Grad-CAM paper, Selvaraju et al. 2017, sec. 4.1).

For a map L (already upsampled to the H x W model input) and a fraction ``f`` (0.15 in both
papers)::

    B         = { (i, j) : L_ij >= f * max L }             (binarised map)
    S         = the largest 8-connected segment of B        (most pixels; ties: the first in
                                                            row-major order of its first pixel)
    box(S)    = (x0, y0, x1, y1) = (min j, min i, max j + 1, max i + 1)    (input pixels)
    IoU(a, b) = |a ∩ b| / |a ∪ b|,  |a| = (x1 - x0)(y1 - y0)

and a map localises its image when the top-1 prediction is right and IoU(box(S), true box)
>= 0.5 (the ILSVRC localisation criterion; the localisation error is the share that does not).

Labelling runs on the CPU, one 2-D :func:`scipy.ndimage.label` call per batch of maps: the
binarised maps are stacked one under the other with an empty row between two (so no segment
joins two maps), which labels 2-4x faster than a 3-D volume with a plane-only structure; there
is no Python loop per map over pixels (the per-map work is reading its winning segment's
slices). Only maps whose image has a true box are labelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

WSL_FRACTION = 0.15  # the papers' binarisation threshold, a fraction of the map's maximum
IOU_CORRECT = 0.5  # the ILSVRC criterion
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


@dataclass(frozen=True)
class Localisation:
    """Per-map WSL results: the largest segment's box (input pixels, NaN for an empty map)
    and its IoU with the true box (NaN without a true box or a segment)."""

    boxes: np.ndarray  # (M, 4) float32 x0, y0, x1, y1
    iou: np.ndarray  # (M,) float32


def largest_segment_boxes(maps: np.ndarray, fraction: float = WSL_FRACTION) -> np.ndarray:
    """(M, H, W) maps -> (M, 4) boxes of each map's largest 8-connected segment at or above
    ``fraction`` of its maximum, x0, y0, x1, y1 in pixels (half-open); NaN where the map's
    maximum is not positive (nothing to localise)."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be (M, H, W), got shape {maps.shape}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the binarisation fraction must be in (0, 1], got {fraction}")
    m = maps.shape[0]
    boxes = np.full((m, 4), np.nan, dtype=np.float32)
    if m == 0:
        return boxes
    peak = maps.reshape(m, -1).max(axis=1)
    h, w = maps.shape[1:]
    tall = np.zeros((m, h + 1, w), dtype=bool)  # the maps one under the other, an empty row between two
    tall[:, :h] = (maps >= fraction * peak[:, None, None]) & (peak[:, None, None] > 0)
    labels, count = ndimage.label(tall.reshape(m * (h + 1), w), structure=_EIGHT)
    if count == 0:
        return boxes
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    objects = ndimage.find_objects(labels)  # label k + 1 -> its bounding slices (rows, cols)
    top = np.array([rows.start for rows, _ in objects])
    plane = top // (h + 1)
    # Largest label per map: labels are numbered in row-major scan order, so among equal
    # sizes the lowest label (first reached) wins.
    order = np.lexsort((np.arange(count), -sizes, plane))
    first = order[np.r_[True, plane[order][1:] != plane[order][:-1]]]
    for k in first:  # one per map with a segment: slices to numbers (no pixel work)
        rows, cols = objects[k]
        y0 = rows.start - plane[k] * (h + 1)
        boxes[plane[k]] = (cols.start, y0, cols.stop, y0 + rows.stop - rows.start)
    return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of (M, 4) boxes x0, y0, x1, y1 (NaN rows give NaN)::

        IoU = w_i h_i / (|a| + |b| - w_i h_i),  w_i = max(0, min(a_x1, b_x1) - max(a_x0, b_x0)), h_i likewise
    """
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (inter / (area_a + area_b - inter)).astype(np.float32)


def localise(up: torch.Tensor, true_boxes: torch.Tensor, fraction: float = WSL_FRACTION) -> Localisation:
    """WSL boxes of upsampled maps (M, H, W) whose image has a box in ``true_boxes`` (M, 4,
    input pixels, NaN rows: none; clamped to the input as they are drawn on it), and their IoU
    with it: 0 for an empty map (no segment, no box), NaN for the maps without a true box."""
    size = np.array([up.shape[-1], up.shape[-2], up.shape[-1], up.shape[-2]], dtype=np.float32)
    truth = np.clip(true_boxes.detach().float().cpu().numpy(), 0, size)
    has_box = ~np.isnan(truth).any(axis=1)
    boxes = np.full((up.shape[0], 4), np.nan, dtype=np.float32)
    if has_box.any():
        pick = torch.from_numpy(np.flatnonzero(has_box)).to(up.device)
        boxes[has_box] = largest_segment_boxes(up[pick].detach().float().cpu().numpy(), fraction)
    iou = box_iou(boxes, truth)
    iou[has_box & np.isnan(boxes[:, 0])] = 0.0  # an empty map localises nothing
    return Localisation(boxes=boxes, iou=iou)


def wsl_columns(located: Localisation, is_predicted: np.ndarray, is_label: np.ndarray,
                judged: np.ndarray) -> dict[str, object]:
    """The ``explanations`` columns of the maps' WSL: the box, its IoU, and ``localised`` =
    the map is of a predicted class that is a true label (multi-class: the top-1 prediction
    is right) and IoU >= 0.5; False for a predicted class that is no label; null for the maps
    of other targets, of images without a box or a judged label (``judged`` False)."""
    iou = located.iou
    known = is_predicted & judged & ~np.isnan(iou)
    with np.errstate(invalid="ignore"):
        localised = pd.array(is_label & (iou >= IOU_CORRECT), dtype="boolean")
    localised[~known] = pd.NA
    return {**{f"wsl_box_{name}": located.boxes[:, i] for i, name in enumerate(("x0", "y0", "x1", "y1"))},
            "wsl_iou": iou, "localised": localised}
