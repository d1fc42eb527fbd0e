"""``attention_off_object``: per class, do the Grad-CAM maps favour the object box over a
uniform map?

Uses each image's map for its own label(s). A map's energy share inside the box, ``e``, is
compared with what a uniform map gets there, the box's area share ``a``. On a scale that a
large box cannot break, the normalised excess

    s = (e - a) / (1 - a)

is 0 for a uniform map, 1 for a map entirely inside the box and negative when the box gets
less than its share (1 - a is the most a map can add to a uniform one). Per class, the share
of images with ``s > 0`` (their map beats a uniform one in the box) is a sign test: the
class is flagged when the upper end of its Wilson interval (at ``slice_confidence``) is
below ``off_object_share``, i.e. most of its maps surely put LESS in the box than a uniform
map would. Images whose box covers nearly the whole input (``a >= MAX_BOX_SHARE``) carry
no information and are left out.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd

from visaudit.tasks.data.columns import is_in
from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.stats import wilson_interval
from visaudit.tasks.findings.thresholds import Thresholds, severity

MAX_BOX_SHARE = 0.95  # a box this large leaves no room to tell where a map looks
USED = ("image_id", "target", "layer", "energy_in_box", "box_area_fraction", "pointing_hit")  # explanations' columns read


def normalised_excess(energy: np.ndarray, area: np.ndarray) -> np.ndarray:
    """s = (e - a) / (1 - a): 0 for a uniform map, 1 for a map entirely in the box."""
    return (energy - area) / (1.0 - area)


def attention_off_object(audited: pd.DataFrame, explanations: pd.DataFrame, t: Thresholds) -> list[Finding]:
    """One finding per (class, layer) whose maps surely favour the box less than a uniform map;
    evidence the images with the lowest normalised excess first."""
    if explanations.empty or explanations["energy_in_box"].isna().all():
        return []
    chosen = ((explanations["method"] == "gradcam") & explanations["is_label"] & explanations["energy_in_box"].notna()
              & (explanations["box_area_fraction"] < MAX_BOX_SHARE)).to_numpy(bool) \
        & is_in(explanations["image_id"], audited["image_id"])
    maps = explanations.loc[chosen, list(USED)]  # one copy, of the columns used only
    z = NormalDist().inv_cdf(1 - (1 - t.slice_confidence) / 2)
    found = []
    for (name, layer), group in maps.groupby(["target", "layer"], sort=True):
        n = len(group)
        if n < t.min_class_images:
            continue
        energy = group["energy_in_box"].to_numpy(np.float64)
        area = group["box_area_fraction"].to_numpy(np.float64)
        excess = normalised_excess(energy, area)
        beats = int((excess > 0).sum())
        share = beats / n
        low, high = (float(v) for v in wilson_interval(np.float64(beats), np.float64(n), z))
        if high >= t.off_object_share:
            continue
        median_energy, median_area = float(np.median(energy)), float(np.median(area))
        hits = float(group["pointing_hit"].astype("float").mean())
        where = ("most of the map's energy lies outside the box" if median_energy < 0.5
                 else "the box holds most of the map's energy only because it covers most of the image")
        outside = group.assign(_s=excess).sort_values("_s", kind="stable")
        found.append(Finding(
            kind="attention_off_object",
            severity=severity(share, 0.2, 1.0, larger_is_worse=False),
            class_name=str(name),
            slice=f"layer={layer}",
            metric="share_of_maps_beating_uniform",
            value=share,
            threshold=t.off_object_share,
            message=(
                f"For '{name}', only {beats} of {n} images ({share:.0%}; interval {low:.0%} to {high:.0%}) have "
                f"a Grad-CAM map that puts more energy inside the object box than a uniform map would. "
                f"Median energy in the box {median_energy:.1%}, box share {median_area:.1%} (normalised "
                f"excess {float(np.median(excess)):+.2f}: 0 is a uniform map, 1 all inside the box); "
                f"{where}; the map's peak falls in the box for {hits:.0%} of images. The model's evidence "
                "for this class is elsewhere than the object (background, marks, context): look at the "
                "evidence maps, and remove or balance that cue in the training data."
            ),
            evidence=tuple(outside["image_id"].head(t.evidence)),
        ))
    return found


DETECTOR = Detector(
    kind="attention_off_object",
    detect=lambda tables, t: attention_off_object(tables.audited, tables.explanations, t),
    map_based=True,
    support="association",
)
