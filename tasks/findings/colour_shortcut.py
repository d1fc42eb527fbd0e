"""``colour_shortcut``: a plain colour alone makes the model call a class.

The colour impression of a class (``impressions.colour_r/g/b``: the plain colour whose
flat image raises the class most, and ``colour_probability``, the class's probability for
it) reaching ``colour_shortcut_probability`` means the model takes that colour as evidence
for the class. With the images' border colours (``signals.border_r/g/b``, model-input
pixels in [0, 1]) it tells a background shortcut from a colour cue: the class's images'
median RGB distance (0..255) from the colour at most ``colour_nearer_borders`` times the
other images' is a background shortcut in the data (medium), otherwise a colour cue (low).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.thresholds import Thresholds

BORDERS = ["border_r", "border_g", "border_b"]


def image_borders(audited: pd.DataFrame, signals: pd.DataFrame) -> pd.DataFrame:
    """``image_id``, ``labels`` and ``border_r/g/b`` (0..1) of each audited image with a border colour."""
    if signals.empty or not set(BORDERS) <= set(signals.columns):
        return pd.DataFrame(columns=["image_id", "labels", *BORDERS])
    labelled = audited[["image_id", "labels"]]
    return labelled.merge(signals[["image_id", *BORDERS]], on="image_id").dropna(subset=["border_r"])


def _has(labels: object, name: str) -> bool:
    """Whether a ``labels`` cell (list, array or null) holds ``name``."""
    return isinstance(labels, (list, tuple, np.ndarray)) and name in [str(v) for v in labels]


def colour_finding(class_name: str, rgb: np.ndarray, probability: float, borders: pd.DataFrame,
                   t: Thresholds) -> Finding:
    """The finding of one class whose colour impression ``rgb`` (0..255) reaches the threshold
    with ``probability``; ``borders`` as :func:`image_borders` gives them (may be empty)."""
    message = (f"A plain image of one colour (RGB {int(rgb[0])}, {int(rgb[1])}, {int(rgb[2])}), with no object at "
               f"all, is called {class_name} with probability {probability:.2f}: the model takes that colour as "
               "evidence for the class.")
    level, evidence = "low", ()
    distance = np.linalg.norm(borders[BORDERS].to_numpy(np.float64) * 255 - rgb, axis=1)
    own = borders["labels"].map(lambda labels: _has(labels, class_name)).to_numpy(bool)
    if own.any() and (~own).any():
        near, far = float(np.median(distance[own])), float(np.median(distance[~own]))
        if near <= t.colour_nearer_borders * far:
            level = "medium"
            message += (f" The class's {int(own.sum())} images have borders nearer that colour than the other "
                        f"{int((~own).sum())} (median RGB distance {near:.0f} against {far:.0f}): a background "
                        "shortcut in the data.")
        else:
            message += (f" The class's images' borders are not clearly nearer that colour than the others' "
                        f"(median RGB distance {near:.0f} against {far:.0f}): a colour cue, not the background.")
        nearest = np.argsort(distance[own], kind="stable")[: t.evidence]
        evidence = tuple(borders["image_id"].to_numpy()[own][nearest].tolist())
    return Finding(
        kind="colour_shortcut",
        severity=level,
        class_name=class_name,
        slice=f"rgb=({int(rgb[0])}, {int(rgb[1])}, {int(rgb[2])})",
        metric="colour_probability",
        value=probability,
        threshold=t.colour_shortcut_probability,
        message=message,
        evidence=evidence,
    )


def colour_shortcuts(audited: pd.DataFrame, impressions: pd.DataFrame, signals: pd.DataFrame,
                     t: Thresholds) -> list[Finding]:
    """One finding per class whose colour impression alone reaches ``colour_shortcut_probability``,
    in class order; evidence the class's images whose borders are nearest the colour."""
    if "colour_probability" not in impressions:
        return []
    borders = image_borders(audited, signals)
    found = []
    for row in impressions.sort_values("class_index", kind="stable").itertuples(index=False):
        if pd.isna(row.colour_probability) or float(row.colour_probability) < t.colour_shortcut_probability:
            continue
        probability = float(row.colour_probability)
        rgb = np.array([row.colour_r, row.colour_g, row.colour_b], dtype=np.float64)
        found.append(colour_finding(str(row.class_name), rgb, probability, borders, t))
    return found


DETECTOR = Detector(
    kind="colour_shortcut",
    detect=lambda tables, t: colour_shortcuts(tables.audited, tables.impressions, tables.signals, t),
    needs=("impressions",),
    support="intervention",
)
