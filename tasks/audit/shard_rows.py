"""A shard's table rows: what one batch's tensors become in ``predictions``, ``explanations``
and ``occlusion`` (the per-image Python work of a shard is this bookkeeping)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from visaudit.tasks.data.images import Decoded
from visaudit.tasks.data.schema import table_schema
from visaudit.tasks.explain import cam, localisation, occlusion, signals

if TYPE_CHECKING:
    from visaudit.tasks.audit.shard import ShardSettings


@dataclass
class BatchResult:
    probs: np.ndarray  # (N, K)
    top_index: np.ndarray  # (N, k)
    top_score: np.ndarray
    predicted: np.ndarray  # (N, K) bool
    loss: np.ndarray  # (N,) NaN where no known label
    correct: np.ndarray  # (N,) float 1/0/NaN
    pairs: np.ndarray  # (M, 2) image, class
    is_predicted: np.ndarray  # (M,)
    is_label: np.ndarray
    maps: dict[tuple[str, str], np.ndarray]  # (method, layer) -> (M, h, w)
    scores: dict[tuple[str, str], cam.MapScores]
    located: dict[tuple[str, str], localisation.Localisation]  # WSL box and IoU of each map
    occlusion: np.ndarray | None = None  # (M, gh, gw) drops of the target's probability
    occlusion_scores: cam.MapScores | None = None
    faithfulness: np.ndarray | None = None  # (M,) Spearman(Grad-CAM pooled to the grid, occlusion)
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (N, C)
    properties: dict[str, np.ndarray] = field(default_factory=dict)  # image property -> (N,)
    thumbnails: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))  # (N, 192)
    finite: np.ndarray = field(default_factory=lambda: np.ones(0, bool))  # (N,) every class score finite


@dataclass
class BatchRows:
    """One batch's rows of each table a shard writes (None: the batch has none of that table)."""

    predictions: pd.DataFrame
    explanations: pd.DataFrame | None = None
    signals: pd.DataFrame | None = None
    occlusion: pd.DataFrame | None = None


def batch_rows(
    batch: pd.DataFrame,
    decoded: list[Decoded | str],
    ok: list[int],
    result: BatchResult | None,
    settings: ShardSettings,
) -> BatchRows:
    """Every table's rows of one batch: ``decoded[i]`` is row ``i``'s image or its error, ``ok``
    the rows with a result (in ``result``'s order; None when no image of the batch was read)."""
    rows = BatchRows(prediction_rows(batch, decoded, ok, result, settings))
    if result is None:
        return rows
    audited = batch.iloc[ok]
    rows.explanations = explanation_rows(audited, result, settings)
    rows.signals = signals.signal_rows(audited["image_id"].to_numpy(), result.probs, result.embeddings,
                                       result.properties, result.thumbnails)
    if result.occlusion is not None:
        rows.occlusion = occlusion_rows(audited, result, settings)
    return rows


def prediction_rows(
    batch: pd.DataFrame,
    decoded: list[Decoded | str],
    ok: list[int],
    result: BatchResult | None,
    settings: ShardSettings,
) -> pd.DataFrame:
    classes = np.array(settings.classes, dtype=object)
    n = len(batch)
    out = pd.DataFrame(
        {
            "image_id": batch["image_id"].to_numpy(),
            "uri": batch["uri"].to_numpy(),
            "labels": batch["labels"].tolist(),
            "predicted": [None] * n,
            "top_classes": [None] * n,
            "top_scores": [None] * n,
            "confidence": np.full(n, np.nan, dtype=np.float32),
            "correct": pd.array([pd.NA] * n, dtype="boolean"),
            "loss": np.full(n, np.nan, dtype=np.float32),
            "image_height": pd.array([pd.NA] * n, dtype="Int32"),
            "image_width": pd.array([pd.NA] * n, dtype="Int32"),
            "box_x0": batch["box_x0"].to_numpy(dtype=np.float32),
            "box_y0": batch["box_y0"].to_numpy(dtype=np.float32),
            "box_x1": batch["box_x1"].to_numpy(dtype=np.float32),
            "box_y1": batch["box_y1"].to_numpy(dtype=np.float32),
            "attributes": [list(a.items()) for a in batch["attributes"]],
            "error": [d if isinstance(d, str) else None for d in decoded],
        }
    )
    if result is None:
        return out
    ok_index = np.array(ok)
    out.loc[ok_index, "predicted"] = pd.Series([list(classes[row]) for row in result.predicted], index=ok_index)
    out.loc[ok_index, "top_classes"] = pd.Series([list(classes[row]) for row in result.top_index], index=ok_index)
    out.loc[ok_index, "top_scores"] = pd.Series([list(row) for row in result.top_score], index=ok_index)
    out.loc[ok_index, "confidence"] = result.top_score[:, 0]
    out.loc[ok_index, "loss"] = result.loss
    correct = pd.array([None if np.isnan(c) else bool(c) for c in result.correct], dtype="boolean")
    out.loc[ok_index, "correct"] = correct
    out.loc[ok_index, "image_height"] = [decoded[i].height for i in ok]  # type: ignore[union-attr]
    out.loc[ok_index, "image_width"] = [decoded[i].width for i in ok]  # type: ignore[union-attr]
    return out


def occlusion_rows(batch: pd.DataFrame, result: BatchResult, settings: ShardSettings) -> pd.DataFrame:
    """One row per (image, target) pair: the occlusion map at grid resolution and its scores."""
    assert result.occlusion is not None and result.occlusion_scores is not None
    spec = settings.occlusion or occlusion.OcclusionSpec()
    geometry = spec.geometry(settings.preprocess.crop)
    maps, scores = result.occlusion, result.occlusion_scores
    m = maps.shape[0]
    faithfulness = result.faithfulness if result.faithfulness is not None else np.full(m, np.nan, dtype=np.float32)
    return pd.DataFrame(
        {
            "image_id": batch["image_id"].to_numpy()[result.pairs[:, 0]],
            **_map_columns(result, settings, maps),
            "window": np.full(m, geometry.window[0], dtype=np.int32),
            "stride": np.full(m, geometry.stride[0], dtype=np.int32),
            "baseline": spec.baseline,
            "peak_x": ((scores.peak_col.cpu().numpy() + 0.5) / settings.preprocess.crop).astype(np.float32),
            "peak_y": ((scores.peak_row.cpu().numpy() + 0.5) / settings.preprocess.crop).astype(np.float32),
            **_box_columns(scores),
            "gradcam_spearman": faithfulness,
        }
    )


def _map_columns(result: BatchResult, settings: ShardSettings, maps: np.ndarray) -> dict[str, object]:
    """The columns every stored map has: its (image, class) pair's target and the map itself."""
    m, h, w = maps.shape
    return {
        "target": np.array(settings.classes, dtype=object)[result.pairs[:, 1]],
        "target_index": result.pairs[:, 1].astype(np.int32),
        "is_predicted": result.is_predicted,
        "is_label": result.is_label,
        "height": np.full(m, h, dtype=np.int32),
        "width": np.full(m, w, dtype=np.int32),
        "heatmap": list(maps.reshape(m, -1)),
    }


def _box_columns(scores: cam.MapScores) -> dict[str, object]:
    """A map's scores against the image's box (NaN / null without a box)."""
    return {
        "energy_in_box": scores.energy_in_box.cpu().numpy(),
        "box_area_fraction": scores.box_area_fraction.cpu().numpy(),
        "pointing_hit": pd.array([None if np.isnan(v) else bool(v) for v in scores.pointing_hit.cpu().numpy()],
                                 dtype="boolean"),
    }


def explanation_rows(batch: pd.DataFrame, result: BatchResult, settings: ShardSettings) -> pd.DataFrame:
    image_ids = batch["image_id"].to_numpy()[result.pairs[:, 0]]
    judged = ~np.isnan(result.correct[result.pairs[:, 0]])
    frames = []
    for (method, layer), maps in result.maps.items():
        scores = result.scores[(method, layer)]
        columns = _map_columns(result, settings, maps)
        frames.append(
            pd.DataFrame(
                {
                    "image_id": image_ids,
                    "method": method,
                    "layer": layer,
                    **columns,
                    "peak_row": scores.peak_row.cpu().numpy().astype(np.int32),
                    "peak_col": scores.peak_col.cpu().numpy().astype(np.int32),
                    "peak_x": scores.peak_x.cpu().numpy(),
                    "peak_y": scores.peak_y.cpu().numpy(),
                    **_box_columns(scores),
                    **localisation.wsl_columns(result.located[(method, layer)], result.is_predicted,
                                               result.is_label, judged),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else table_schema("explanations").empty_table().to_pandas()
