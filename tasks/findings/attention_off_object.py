"""``attention_off_object``: per class, Grad-CAM energy inside the object box against a
uniform map's (the box-area fraction).

Uses each image's map for its own label(s). A model looking at the object puts far more
than the area fraction of its map inside the box; one looking elsewhere (a mark, the
background) puts about that much or less. Needs boxes; flagged when the lift (median
energy in box / median box area) is below ``off_object_lift``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.thresholds import Thresholds, severity


def attention_off_object(audited: pd.DataFrame, explanations: pd.DataFrame, t: Thresholds) -> list[Finding]:
    """One finding per (class, layer) whose maps' energy in the box is too little; evidence
    the images with least energy in the box first."""
    if explanations.empty or explanations["energy_in_box"].isna().all():
        return []
    maps = explanations[
        (explanations["method"] == "gradcam") & explanations["is_label"] & explanations["energy_in_box"].notna()
    ]
    maps = maps[maps["image_id"].isin(audited["image_id"])]
    found = []
    for (name, layer), group in maps.groupby(["target", "layer"], sort=True):
        if len(group) < t.min_class_images:
            continue
        energy = float(group["energy_in_box"].median())
        area = float(group["box_area_fraction"].median())
        lift = energy / area if area > 0 else np.inf
        if lift >= t.off_object_lift:
            continue
        hits = group["pointing_hit"].astype("float").mean()
        outside = group.sort_values("energy_in_box")
        found.append(Finding(
            kind="attention_off_object",
            severity=severity(lift, 0.5, 1.0, larger_is_worse=False),
            class_name=str(name),
            slice=f"layer={layer}",
            metric="energy_in_box_lift",
            value=float(lift),
            threshold=t.off_object_lift,
            message=(
                f"For '{name}', the median Grad-CAM energy inside the object box is {energy:.1%} "
                f"while the box covers {area:.1%} of the image ({lift:.2f}x a uniform map); "
                f"the map's peak falls in the box for {hits:.0%} of images. The model's evidence "
                "for this class lies mostly outside the object (background, marks, context): "
                "look at the evidence maps, and remove or balance that cue in the training data."
            ),
            evidence=tuple(outside["image_id"].head(t.evidence)),
        ))
    return found


DETECTOR = Detector(
    kind="attention_off_object",
    detect=lambda tables, t: attention_off_object(tables.audited, tables.explanations, t),
    map_based=True,
)
