"""Example images as the template shows them: a thumbnail strip (the image and its maps) and
what the model said. Built for a finding's evidence, the failure gallery and the layer strips."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from visaudit.tasks.data.sources import attribute_pairs
from visaudit.tasks.explain.catalogue import method_title
from visaudit.tasks.report.figures import Painter
from visaudit.tasks.report.formatting import file_name, names, optional_float, values

LAYER_STRIP_EXAMPLES = 4


@dataclass(frozen=True)
class Thumb:
    """One picture slot of an example: a path relative to the run folder, or None (unavailable)."""

    src: str | None
    caption: str


@dataclass(frozen=True)
class Example:
    """One image shown in the report, with its thumbnails and what the model said about it."""

    image_id: str
    file_name: str
    labels: list[str]
    predicted: list[str]
    confidence: float | None
    top: list[tuple[str, float]]
    attributes: list[tuple[str, str]]
    thumbs: list[Thumb]
    target_rows: list[TargetRow] = field(default_factory=list)  # the other explained classes, one row each


@dataclass(frozen=True)
class TargetRow:
    """The maps of one more explained class of the image (``--targets top3``, ``--target-class``)."""

    target: str
    thumbs: list[Thumb]


def make_example(row: pd.Series, thumbs: list[Thumb], target_rows: list[TargetRow] | None = None) -> Example:
    """A ``predictions`` row with its thumbnails (and rows of the other explained classes)."""
    top = list(zip(names(row["top_classes"]), [float(s) for s in values(row["top_scores"])]))
    return Example(
        image_id=str(row["image_id"]),
        file_name=file_name(str(row["uri"])),
        labels=names(row["labels"]),
        predicted=names(row["predicted"]),
        confidence=optional_float(row["confidence"]),
        top=top,
        attributes=[(str(k), str(v)) for k, v in attribute_pairs(row["attributes"])],
        thumbs=thumbs,
        target_rows=target_rows or [],
    )


def image_thumb(painter: Painter, image_id: str) -> Thumb:
    """The image's own thumbnail slot."""
    return Thumb(painter.image(image_id), "image")


def evidence_example(row: pd.Series, class_name: str | None, painter: Painter, layer: str | None) -> Example:
    """An evidence image and every stored method's map for the TRUE label (the finding's class
    first), else the prediction: Grad-CAM at the finding's layer, the others beside it; then one
    row per other class explained for the image (the predicted one, ``--targets top3``,
    ``--target-class``), in the order they were stored."""
    image_id = str(row["image_id"])
    labels = names(row["labels"])
    preferred = [class_name] if class_name in labels else []
    targets = preferred + labels + names(row["predicted"])
    target = next((t for t in targets if painter.find_map(image_id, t, layer) is not None), None)
    thumbs = [image_thumb(painter, image_id), *_target_maps(painter, image_id, target, layer)]
    others = [TargetRow(t, _target_maps(painter, image_id, t, layer))
              for t in painter.targets.get(image_id, []) if target is not None and t != target]
    return make_example(row, thumbs, [other for other in others if other.thumbs])


def _target_maps(painter: Painter, image_id: str, target: str | None, layer: str | None) -> list[Thumb]:
    """Every stored method's map of ``target`` for the image (Grad-CAM at ``layer``)."""
    thumbs = []
    for method in painter.methods if target is not None else []:
        at = layer if method == painter.method else None
        if painter.find_map(image_id, target, at, method) is not None:
            thumbs.append(Thumb(painter.overlay(image_id, target, at, method), f"{method_title(method)}: {target}"))
    return thumbs


def failure_gallery(predictions: pd.DataFrame, size: int) -> pd.DataFrame:
    """Wrong predictions, most confident first (ties in table order; no confidence: last)."""
    wrong = np.flatnonzero(predictions["error"].isna() & predictions["correct"].eq(False).fillna(False).astype(bool))
    confidence = predictions["confidence"].to_numpy(dtype=np.float64)[wrong]
    return predictions.iloc[wrong[most_confident(confidence, max(0, size))]]


def most_confident(confidence: np.ndarray, size: int) -> np.ndarray:
    """Positions of the ``size`` highest values, highest first, ties in order, NaN last: a stable
    descending sort's head, without sorting every row."""
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    unscored = np.isnan(confidence)
    scored = np.flatnonzero(~unscored)
    if size < len(scored):
        kth = np.partition(confidence[scored], len(scored) - size)[len(scored) - size]
        scored = scored[confidence[scored] >= kth]
    best = scored[np.argsort(-confidence[scored], kind="stable")][:size]
    return np.concatenate([best, np.flatnonzero(unscored)[: size - len(best)]]).astype(np.int64)


def gallery_example(row: pd.Series, painter: Painter, multilabel: bool) -> Example:
    """A failure: the image, the map of the (wrongly) predicted class, and that of the true class."""
    labels, predicted = names(row["labels"]), names(row["predicted"])
    if multilabel:
        wrong_prediction = next((p for p in predicted if p not in labels), predicted[0] if predicted else None)
        missed_label = next((t for t in labels if t not in predicted), labels[0] if labels else None)
    else:
        wrong_prediction = predicted[0] if predicted else None
        missed_label = labels[0] if len(labels) == 1 else None
    image_id = str(row["image_id"])
    thumbs = [image_thumb(painter, image_id)]
    thumbs += [
        Thumb(painter.overlay(image_id, target), f"{role}: {target}")
        for role, target in (("predicted", wrong_prediction), ("true", missed_label))
        if target and painter.find_map(image_id, target) is not None
    ]
    return make_example(row, thumbs)


def layer_strips(rows: list[pd.Series], painter: Painter) -> list[Example]:
    """Grad-CAM of the predicted class at every stored stage, shallow to deep, for a few images."""
    if len(painter.layers) < 2:
        return []
    strips = []
    for row in rows[:LAYER_STRIP_EXAMPLES]:
        image_id = str(row["image_id"])
        target = next((t for t in names(row["predicted"]) if painter.find_map(image_id, t) is not None), None)
        if target is None:
            continue
        thumbs = [image_thumb(painter, image_id)]
        thumbs += [
            Thumb(painter.overlay(image_id, target, layer), f"{layer}: {target}")
            for layer in painter.layers
            if painter.find_map(image_id, target, layer) is not None
        ]
        strips.append(make_example(row, thumbs))
    return strips
