"""The class-impressions section: each class's impression beside its Grad-CAM, its colour
impression and a few real images of the class, with notes on where its evidence sits and on
the ``colour_shortcut`` finding of the class."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from visaudit.tasks.data.columns import class_codes, flat_items
from visaudit.tasks.report.examples import Thumb, most_confident
from visaudit.tasks.report.figures import PREFERRED_METHOD, Painter
from visaudit.tasks.report.formatting import file_name, optional_float, score

IMPRESSION_EXAMPLES = 3  # real images shown beside each class impression
SAME_SPOT_RADIUS = 0.2  # a real image's Grad-CAM peak this close to the impression's evidence counts as the same spot
SAME_SPOT_SHARE = 0.5  # ... and this share of the class's images peaking there makes it a fixed position
COLOUR_FINDING = "colour_shortcut"  # the findings' kind for a plain colour that alone wins a class


@dataclass(frozen=True)
class ImpressionRow:
    """One class's impression strip and caption."""

    class_name: str
    probability: str
    start_probability: str
    competitor: str | None
    thumbs: list[Thumb]
    note: str | None


@dataclass(frozen=True)
class ImpressionsView:
    """Every class's impression and the optimisation's settings."""

    rows: list[ImpressionRow]
    iterations: int
    seed: int
    layer: str
    objective: str


def impression_examples(predictions: pd.DataFrame, class_names: Iterable[str], count: int) -> dict[str, list[str]]:
    """Per impression class, up to ``count`` real images labelled with it: correct ones first,
    most confident first."""
    names = list(class_names)
    if not names:
        return {}
    readable = predictions[predictions["error"].isna()]
    rows, items = flat_items(readable["labels"])  # one (image, label) pair per label, in table order
    codes = class_codes(items, names)  # a name's code: its last position in ``names``
    position = {name: i for i, name in enumerate(names)}
    right = readable["correct"].eq(True).fillna(False).astype(bool).to_numpy()[rows]
    confidence = readable["confidence"].to_numpy(dtype=np.float64)[rows]
    ids = readable["image_id"].to_numpy(dtype=object)[rows]
    out: dict[str, list[str]] = {}
    for name in names:
        mine = np.flatnonzero(codes == position[name])
        picked: list[int] = []
        for group in (mine[right[mine]], mine[~right[mine]]):  # correct ones first
            picked += group[most_confident(confidence[group], count - len(picked))].tolist()
        out[name] = ids[picked].tolist()
    return out


def label_peaks(explanations: pd.DataFrame) -> pd.DataFrame:
    """Grad-CAM peaks of every image's map for its own label(s): where real images' evidence sits."""
    own = explanations[(explanations["method"] == PREFERRED_METHOD) & explanations["is_label"]]
    return own[["layer", "target", "peak_x", "peak_y"]]


def colour_notes(findings: pd.DataFrame) -> dict[str, str]:
    """Per class, the message of its ``colour_shortcut`` finding."""
    rows = findings[findings["kind"] == COLOUR_FINDING].dropna(subset=["class_name"])
    return dict(zip(rows["class_name"], rows["message"]))


def position_words(x: float, y: float) -> str:
    """Where a point (0..1 of width and height) lies, in words: "top-left", "centre", ..."""
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else "middle"
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "centre"
    if vertical == "middle":
        return "centre" if horizontal == "centre" else horizontal
    return vertical if horizontal == "centre" else f"{vertical}-{horizontal}"


def impression_note(row: Any, peaks: pd.DataFrame) -> str | None:
    """Says where an impression's evidence sits when that is off-centre, and whether the class's
    real images peak on the same spot (a fixed-position cue), with the numbers."""
    if not bool(row.off_centre) or optional_float(row.centroid_x) is None:
        return None
    x, y = float(row.centroid_x), float(row.centroid_y)
    note = f"Its evidence sits off-centre, at the {position_words(x, y)} (x {x:.2f}, y {y:.2f})."
    own = peaks[(peaks["target"] == row.class_name) & (peaks["layer"] == row.layer)].dropna(subset=["peak_x", "peak_y"])
    if len(own):
        share = float((np.hypot(own["peak_x"] - x, own["peak_y"] - y) <= SAME_SPOT_RADIUS).mean())
        note += f" {share:.0%} of the {len(own)} real images of the class peak within {SAME_SPOT_RADIUS} of that spot"
        note += ": a fixed-position cue the model relies on." if share >= SAME_SPOT_SHARE else "."
    return note


def impression_thumbs(row: Any, painter: Painter, examples: list[str], by_id: pd.DataFrame) -> list[Thumb]:
    """The impression, its Grad-CAM, its colour impression (when computed) and real images of the class."""
    heat = np.asarray(row.heatmap, dtype=np.float32).reshape(row.height, row.width)
    present = (painter.run_dir / row.image_path).is_file()
    overlay = painter.picture_overlay(row.image_path, heat) if present and heat.size else None  # 0x0: no layer
    thumbs = [Thumb(row.image_path if present else None, "impression")]
    if overlay is not None:
        thumbs.append(Thumb(overlay, "Grad-CAM"))
    if optional_float(getattr(row, "colour_probability", None)) is not None:
        rgb = np.array([row.colour_r, row.colour_g, row.colour_b], dtype=np.uint8)
        thumbs.append(Thumb(painter.swatch(rgb), f"colour alone: {score(row.colour_probability)}"))
    thumbs += [Thumb(painter.image(image_id), file_name(str(by_id.loc[image_id, "uri"])))
               for image_id in examples if image_id in by_id.index]
    return thumbs


def impressions_view(impressions: pd.DataFrame, examples: Mapping[str, list[str]], by_id: pd.DataFrame,
                     painter: Painter, peaks: pd.DataFrame, colour: Mapping[str, str]) -> ImpressionsView | None:
    """Each class impression with its thumbnails and notes; None when impressions were not computed.
    ``examples``: real image ids per class; ``colour``: the colour-shortcut note per class."""
    if impressions.empty:
        return None
    rows = []
    for row in impressions.sort_values("class_index", kind="stable").itertuples(index=False):
        notes = (impression_note(row, peaks), colour.get(row.class_name))
        rows.append(ImpressionRow(
            class_name=row.class_name,
            probability=score(row.probability),
            start_probability=score(row.start_probability),
            competitor=f"{row.competitor_name} {score(row.competitor_probability)}" if row.competitor_index >= 0 else None,
            thumbs=impression_thumbs(row, painter, examples.get(row.class_name, []), by_id),
            note=" ".join(note for note in notes if note) or None,
        ))
    first = impressions.iloc[0]
    objective = json.loads(first["parameters"]).get("objective", "logit")  # runs before the option ascended the logit
    return ImpressionsView(rows=rows, iterations=int(first["iterations"]), seed=int(first["seed"]),
                           layer=first["layer"], objective=objective)
