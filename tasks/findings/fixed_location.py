"""The probes behind ``attention_fixed_location``: a class whose evidence is the same small
thing at the same place (the detector, which judges their results, is ``attention_fixed_location``).

Three tests, all needed (a class whose objects simply tend to be centred passes the first
and fails the second):

1. **Peaks cluster.** Grad-CAM peaks of the class's own-label maps: the densest spot (the
   peak with most other peaks within ``RADIUS`` of the image side) holds at least
   ``fixed_location_share`` of them.
2. **Same content.** Near the spot (within ``SEARCH_RADIUS``: a Grad-CAM peak can sit some
   way from a small mark), the square patch whose content varies least across sample
   images of the class: its median pairwise RMS distance across the images, divided by
   the median of that spread over every patch of its size (1/16, 1/8 or 1/4 of the side),
   is at most ``fixed_location_patch_ratio``. A mark is the same in every image while the
   images vary; the middle of centred objects is not.
3. **The model depends on it (occlusion).** Muting a square twice the patch's side
   (setting it to the dataset mean, 0 after normalisation) drops the class's probability
   by at least ``fixed_location_drop`` on average, and at least ``fixed_location_control``
   times the drop from muting squares of that size at reference spots far from it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from visaudit.tasks.data.columns import is_in
from visaudit.tasks.data.records import MetricRow
from visaudit.tasks.findings.probe_records import LocationCandidate, LocationProbe
from visaudit.tasks.findings.thresholds import Thresholds

# Method parameters (how the spot is measured, not when it is flagged: those are in Thresholds)
RADIUS = 0.125  # of the image side: peaks this close share a spot; the patch is twice this wide
SAMPLE_IMAGES = 16  # images per candidate class that are probed
PEAKS = 2000  # a class's first peaks (by row) that test 1 clusters
REFERENCE_SPOTS = 4  # spots far from the mark muted for the control drop


def _within(xy: np.ndarray, spot: np.ndarray) -> np.ndarray:
    """Which points of ``xy`` (N, 2) lie within ``RADIUS`` of ``spot`` (2,)."""
    return np.hypot(*(spot[None, :] - xy).T) <= RADIUS


def _neighbour_counts(xy: np.ndarray, rows: int = 256) -> np.ndarray:
    """For each point of ``xy`` (N, 2), how many points (itself included) lie within ``RADIUS``:
    the distances ``rows`` points at a time, never the whole (N, N) matrix (96 MB in flight at 2,000 peaks)."""
    counts = [(np.hypot(*(part[:, None, :] - xy[None, :, :]).transpose(2, 0, 1)) <= RADIUS).sum(axis=1)
              for part in np.split(xy, range(rows, len(xy), rows))]
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def location_candidates(audited: pd.DataFrame, explanations: pd.DataFrame, t: Thresholds) -> list[LocationCandidate]:
    """Classes whose Grad-CAM peaks cluster at one spot (test 1)."""
    if explanations.empty:
        return []
    own = (explanations["method"] == "gradcam") & explanations["is_label"]
    maps = explanations.loc[own, ["image_id", "target", "peak_x", "peak_y"]]  # the columns read, not the whole rows
    maps = maps[is_in(maps["image_id"], audited["image_id"])].dropna(subset=["peak_x", "peak_y"])
    found = []
    for name, group in maps.groupby("target", sort=True):
        if len(group) < t.min_class_images:
            continue
        xy = group[["peak_x", "peak_y"]].to_numpy(np.float64)[:PEAKS]
        densest = int(_neighbour_counts(xy).argmax())
        members = _within(xy, xy[densest])
        share = float(members.mean())
        if share < t.fixed_location_share:
            continue
        centre = xy[members].mean(axis=0)
        ids = group["image_id"].to_numpy()[: len(xy)][members]
        found.append(LocationCandidate(str(name), float(centre[0]), float(centre[1]), share, len(xy),
                                       tuple(ids[:SAMPLE_IMAGES].tolist())))
    return found


PATCH_FRACTIONS = (1 / 16, 1 / 8, 1 / 4)  # patch sides searched, as fractions of the input side
SEARCH_RADIUS = 0.3  # of the side: Grad-CAM peaks sit this far from a small mark at most (receptive fields)


def reference_spots(x: float, y: float, count: int = REFERENCE_SPOTS) -> list[tuple[float, float]]:
    """Grid spots far from (x, y), farthest first."""
    grid = [(gx, gy) for gy in (0.2, 0.5, 0.8) for gx in (0.2, 0.5, 0.8)]
    far = [(gx, gy) for gx, gy in grid if np.hypot(gx - x, gy - y) >= 2 * RADIUS]
    far.sort(key=lambda p: -np.hypot(p[0] - x, p[1] - y))
    return far[:count]


def patch_spreads(inputs: torch.Tensor, side: int, stride: int) -> torch.Tensor:
    """Median pairwise RMS distance, across images, of the patch at every position: (rows, cols)."""
    n, _, size, _ = inputs.shape
    patches = torch.nn.functional.unfold(inputs.double(), side, stride=stride)  # (N, C*side*side, L)
    per_spot = patches.permute(2, 0, 1)  # (L, N, D)
    d = torch.cdist(per_spot, per_spot) / np.sqrt(per_spot.shape[-1])
    upper = torch.triu_indices(n, n, offset=1)
    spreads = d[:, upper[0], upper[1]].median(dim=1).values
    positions = (size - side) // stride + 1
    return spreads.view(positions, positions)


def most_constant_patch(
    inputs: torch.Tensor, x: float, y: float, max_ratio: float = Thresholds.fixed_location_patch_ratio
) -> tuple[float, float, int, float]:
    """Test 2: near (x, y), the patch whose content varies least across the images, relative to
    patches of its size anywhere in them. Of the sizes whose best patch is constant (ratio at
    most ``max_ratio``) the largest is returned, so that muting covers the whole mark; with
    none constant, the lowest ratio. Returns its centre (fractions), side (pixels) and ratio."""
    size = inputs.shape[-1]
    best_per_size = []
    for fraction in PATCH_FRACTIONS:
        side = max(2, round(size * fraction))
        stride = max(1, side // 2)
        spreads = patch_spreads(inputs, side, stride)
        reference = float(spreads.median())
        if reference <= 0:
            continue
        centres = (torch.arange(spreads.shape[0], dtype=torch.float64) * stride + side / 2) / size
        near = (centres.view(1, -1) - x) ** 2 + (centres.view(-1, 1) - y) ** 2 <= SEARCH_RADIUS**2
        ratio = torch.where(near, spreads / reference, torch.full_like(spreads, float("inf")))
        row, col = divmod(int(ratio.argmin()), ratio.shape[1])
        best_per_size.append((float(centres[col]), float(centres[row]), side, float(ratio[row, col])))
    if not best_per_size:
        return x, y, max(2, round(size * PATCH_FRACTIONS[1])), float("inf")
    constant = [b for b in best_per_size if b[3] <= max_ratio]
    return max(constant, key=lambda b: b[2]) if constant else min(best_per_size, key=lambda b: b[3])


def _square(x: float, y: float, side: int, size: int) -> tuple[int, int, int]:
    """Top-left corner and side, in pixels, of the square centred at (x, y) (fractions), kept inside."""
    side = min(side, size)
    left = int(np.clip(round(x * size - side / 2), 0, size - side))
    top = int(np.clip(round(y * size - side / 2), 0, size - side))
    return left, top, side


@torch.no_grad()
def probe_location(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    class_index: int,
    x: float,
    y: float,
    multi_label: bool = False,
    max_ratio: float = Thresholds.fixed_location_patch_ratio,
) -> LocationProbe:
    """Tests 2 and 3 on (N, 3, S, S) normalised inputs of the class (N >= 2), near the spot (x, y).
    Test 3 (the model's forwards) runs only when test 2 finds a constant patch; else its
    numbers are NaN."""
    if inputs.ndim != 4 or len(inputs) < 2:
        raise ValueError("probe_location needs a batch of at least two images")
    size = inputs.shape[-1]
    px, py, side, ratio = most_constant_patch(inputs, x, y, max_ratio)
    if ratio > max_ratio:  # test 2 failed: no mark to mute, skip the model's forwards
        nan = float("nan")
        return LocationProbe(x=px, y=py, side=side / size, patch_ratio=ratio, drop=nan, control_drop=nan,
                             flip_share=nan, images=len(inputs))
    spots = [(px, py), *reference_spots(px, py)]
    squares = [_square(sx, sy, 2 * side, size) for sx, sy in spots]  # mute twice the patch: all of the mark
    muted = inputs.unsqueeze(0).repeat(len(spots), 1, 1, 1, 1)
    for k, (left, top, width) in enumerate(squares):
        muted[k, :, :, top : top + width, left : left + width] = 0.0
    was_training = model.training
    model.eval()
    try:
        batch = torch.cat([inputs, muted.flatten(0, 1)])
        chunk = 64 if inputs.is_cuda else 16  # small CPU chunks run faster per image (caches)
        scores = torch.cat([model(part) for part in batch.split(chunk)]).float()
    finally:
        model.train(was_training)
    probs = torch.sigmoid(scores) if multi_label else torch.softmax(scores, dim=1)
    n = len(inputs)
    before = probs[:n]
    after = probs[n:].view(len(spots), n, -1)
    drops = (before[:, class_index].unsqueeze(0) - after[:, :, class_index]).mean(dim=1)
    predicted = before.argmax(dim=1) == class_index
    flipped = after[0].argmax(dim=1) != class_index
    flip_share = float((predicted & flipped).sum() / predicted.sum()) if predicted.any() else 0.0
    return LocationProbe(
        x=px,
        y=py,
        side=side / size,
        patch_ratio=ratio,
        drop=float(drops[0]),
        control_drop=float(drops[1:].mean()) if len(spots) > 1 else 0.0,
        flip_share=flip_share,
        images=n,
    )


def location_metric_rows(
    candidates: list[LocationCandidate], probes: dict[str, LocationProbe], layer: str
) -> list[MetricRow]:
    """``metrics`` rows of every probed candidate, flagged or not: its peak share, patch ratio,
    drops and flip share (method gradcam, at ``layer``, detail its spot)."""
    rows = []
    for c in candidates:
        probe = probes.get(c.class_name)
        if probe is None:
            continue
        for metric, value in (("fixed_location_peak_share", c.share), ("fixed_location_patch_ratio", probe.patch_ratio),
                              ("fixed_location_drop", probe.drop), ("fixed_location_control_drop", probe.control_drop),
                              ("fixed_location_flip_share", probe.flip_share)):
            rows.append(MetricRow(metric=metric, value=float(value), images=probe.images, method="gradcam",
                                  layer=layer, class_name=c.class_name, detail=f"spot=({probe.x:.2f}, {probe.y:.2f})"))
    return rows
