"""``attention_fixed_location``: a class whose evidence is the same small thing at the same place.

Three tests, all needed (a class whose objects simply tend to be centred passes the first
and fails the second):

1. **Peaks cluster.** Grad-CAM peaks of the class's own-label maps: the densest spot (the
   peak with most other peaks within ``RADIUS`` of the image side) holds at least
   ``fixed_location_share`` of them.
2. **Same content.** Square patches cut at that spot from sample images of the class are
   nearly identical while the images vary: the median pairwise RMS distance between the
   attended patches, divided by the same for patches cut at reference spots elsewhere in
   the same images, is at most ``fixed_location_patch_ratio``.
3. **The model depends on it (occlusion).** Muting the patch (setting it to the dataset
   mean, 0 after normalisation) drops the class's probability by at least
   ``fixed_location_drop`` on average, and at least ``fixed_location_control`` times the
   drop from muting the reference spots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from tasks.thresholds import Thresholds, severity

RADIUS = 0.125  # of the image side: peaks this close share a spot; the patch is twice this wide
SAMPLE_IMAGES = 24  # images per candidate class that are probed
REFERENCE_SPOTS = 6


@dataclass(frozen=True)
class LocationCandidate:
    """A class whose map peaks cluster at one spot (x, y as fractions of the input)."""

    class_name: str
    x: float
    y: float
    share: float
    images: int
    sample_ids: tuple[str, ...]  # images of the class whose peak is in the spot, for the probes


@dataclass(frozen=True)
class LocationProbe:
    """What the content and occlusion probes measured for one candidate."""

    patch_ratio: float  # attended-patch spread / reference-patch spread
    drop: float  # mean drop of the class's probability when the spot is muted
    control_drop: float  # the same, muting the reference spots
    flip_share: float  # of the probed images predicted as the class, the share no longer predicted
    images: int


def location_candidates(audited: pd.DataFrame, explanations: pd.DataFrame, t: Thresholds) -> list[LocationCandidate]:
    """Classes whose Grad-CAM peaks cluster at one spot (test 1)."""
    if explanations.empty:
        return []
    maps = explanations[(explanations["method"] == "gradcam") & explanations["is_label"]]
    maps = maps[maps["image_id"].isin(audited["image_id"])].dropna(subset=["peak_x", "peak_y"])
    found = []
    for name, group in maps.groupby("target", sort=True):
        if len(group) < t.min_class_images:
            continue
        xy = group[["peak_x", "peak_y"]].to_numpy(np.float64)[:2000]
        near = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1)) <= RADIUS
        densest = int(near.sum(axis=1).argmax())
        members = near[densest]
        share = float(members.mean())
        if share < t.fixed_location_share:
            continue
        centre = xy[members].mean(axis=0)
        ids = group["image_id"].to_numpy()[: len(xy)][members]
        found.append(LocationCandidate(str(name), float(centre[0]), float(centre[1]), share, len(xy),
                                       tuple(ids[:SAMPLE_IMAGES].tolist())))
    return found


def _square(x: float, y: float, size: int) -> tuple[int, int, int]:
    """Top-left corner and side, in pixels, of the patch centred at (x, y) (fractions), kept inside."""
    side = max(2, int(round(2 * RADIUS * size)))
    left = int(np.clip(round(x * size - side / 2), 0, size - side))
    top = int(np.clip(round(y * size - side / 2), 0, size - side))
    return left, top, side


def reference_spots(x: float, y: float, count: int = REFERENCE_SPOTS) -> list[tuple[float, float]]:
    """Spots on a ring of grid positions at least two patch widths from (x, y)."""
    grid = [(gx, gy) for gy in (0.2, 0.5, 0.8) for gx in (0.2, 0.5, 0.8)]
    far = [(gx, gy) for gx, gy in grid if np.hypot(gx - x, gy - y) >= 4 * RADIUS]
    far.sort(key=lambda p: -np.hypot(p[0] - x, p[1] - y))
    return far[:count]


def _median_pairwise_rms(patches: torch.Tensor) -> float:
    """Median RMS distance over all pairs of (N, P) patch vectors."""
    flat = patches.flatten(1).double()
    d = torch.cdist(flat, flat) / np.sqrt(flat.shape[1])
    upper = torch.triu_indices(len(flat), len(flat), offset=1)
    return float(d[upper[0], upper[1]].median())


@torch.no_grad()
def probe_location(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    class_index: int,
    x: float,
    y: float,
    multi_label: bool = False,
) -> LocationProbe:
    """Tests 2 and 3 on (N, 3, S, S) normalised inputs of the class (N >= 2)."""
    if inputs.ndim != 4 or len(inputs) < 2:
        raise ValueError("probe_location needs a batch of at least two images")
    size = inputs.shape[-1]
    spots = [(x, y), *reference_spots(x, y)]
    squares = [_square(sx, sy, size) for sx, sy in spots]
    patches = [inputs[:, :, top : top + side, left : left + side] for left, top, side in squares]
    spreads = [_median_pairwise_rms(p) for p in patches]
    reference = float(np.median(spreads[1:])) if len(spreads) > 1 else float("nan")
    muted = inputs.unsqueeze(0).repeat(len(spots), 1, 1, 1, 1)
    for k, (left, top, side) in enumerate(squares):
        muted[k, :, :, top : top + side, left : left + side] = 0.0
    was_training = model.training
    model.eval()
    try:
        batch = torch.cat([inputs, muted.flatten(0, 1)])
        scores = torch.cat([model(chunk) for chunk in batch.split(64)]).float()
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
        patch_ratio=spreads[0] / reference if reference > 0 else float("inf"),
        drop=float(drops[0]),
        control_drop=float(drops[1:].mean()) if len(spots) > 1 else 0.0,
        flip_share=flip_share,
        images=n,
    )


def attention_fixed_location(
    candidates: list[LocationCandidate], probes: dict[str, LocationProbe], t: Thresholds
) -> list[dict]:
    """Rows for the candidates whose probes confirm a fixed, same-content, decisive spot."""
    rows = []
    for c in candidates:
        probe = probes.get(c.class_name)
        if probe is None:
            continue
        same_content = probe.patch_ratio <= t.fixed_location_patch_ratio
        decisive = probe.drop >= t.fixed_location_drop and probe.drop >= t.fixed_location_control * max(probe.control_drop, 0.0)
        if not (same_content and decisive):
            continue
        rows.append(
            dict(
                kind="attention_fixed_location",
                severity=severity(probe.drop, 0.4, 0.25),
                class_name=c.class_name,
                slice=f"spot=({c.x:.2f}, {c.y:.2f})",
                metric="probability_drop_when_muted",
                value=probe.drop,
                threshold=t.fixed_location_drop,
                message=(
                    f"For '{c.class_name}', {c.share:.0%} of the Grad-CAM peaks ({c.images} images) fall in one "
                    f"spot at x {c.x:.2f}, y {c.y:.2f} of the image, and what sits there is nearly the same in "
                    f"every image (patch spread {probe.patch_ratio:.2f}x that of patches elsewhere). Muting that "
                    f"spot drops the class's probability by {probe.drop:.2f} on average ({probe.control_drop:.2f} "
                    f"muting elsewhere) and changes {probe.flip_share:.0%} of the class's predictions "
                    f"({probe.images} images probed). The model recognises this class by a mark, tag or "
                    "watermark at a fixed place, not by the object: remove the mark from the training images "
                    f"of '{c.class_name}', or add it to images of other classes."
                ),
                evidence=list(c.sample_ids[: t.evidence]),
            )
        )
    return rows
