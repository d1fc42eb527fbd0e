"""Weakly supervised localisation (largest segment, box, IoU) and the localisation rates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from scipy.stats import binomtest
from skimage.measure import label, regionprops

from visaudit.tasks.explain import cam
from visaudit.tasks.explain.localisation import box_iou, largest_segment_boxes, localise, wsl_columns
from visaudit.tasks.findings.localisation_rates import _single_labels, localisation_metric_rows


def _two_blobs() -> np.ndarray:
    """A 12x12 map: a small bright blob (3x3, value 1) and a larger dim one (3x4, 0.5) whose
    last row touches its top row only diagonally (8-connected, not 4-connected)."""
    m = np.zeros((12, 12), np.float32)
    m[1:4, 1:4] = 1.0
    m[7:9, 5:9] = 0.5
    m[9, 9] = 0.5  # diagonal neighbour of (8, 8): 8-connectivity joins it
    return m


def test_largest_segment_box_and_iou_by_hand() -> None:
    boxes = largest_segment_boxes(_two_blobs()[None], fraction=0.15)
    # the dim blob has 2*4 + 1 = 9 pixels, the bright one 9 too: the tie goes to the first
    # segment reached in row-major order, the bright one; add one pixel to the dim one.
    assert boxes[0].tolist() == [1, 1, 4, 4]
    bigger = _two_blobs()
    bigger[6, 5] = 0.5
    boxes = largest_segment_boxes(bigger[None], fraction=0.15)
    assert boxes[0].tolist() == [5, 6, 10, 10]  # x0, y0, x1, y1: cols 5..9, rows 6..9
    truth = np.array([[4, 6, 10, 10]], np.float32)
    # intersection cols 5..10 x rows 6..10 = 5 * 4 = 20; box 5 * 4 = 20, truth 6 * 4 = 24: 20 / 24
    assert box_iou(boxes, truth)[0] == pytest.approx(20 / 24)


def test_threshold_changes_the_box() -> None:
    bigger = _two_blobs()
    bigger[6, 5] = 0.5
    assert largest_segment_boxes(bigger[None], 0.15)[0].tolist() == [5, 6, 10, 10]
    assert largest_segment_boxes(bigger[None], 0.6)[0].tolist() == [1, 1, 4, 4], "the dim blob falls below 60%"
    assert np.isnan(largest_segment_boxes(np.zeros((1, 5, 5), np.float32))).all(), "an empty map has no box"


def test_against_scikit_image_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((40, 6, 6)).astype(np.float32)) ** 3
    maps = cam.upsample(coarse, 48).numpy()
    for fraction in (0.15, 0.5):
        boxes = largest_segment_boxes(maps, fraction)
        for m, box in zip(maps, boxes):
            regions = regionprops(label(m >= fraction * m.max(), connectivity=2))
            largest = max(r.area for r in regions)
            expected = [(r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]) for r in regions if r.area == largest]
            assert tuple(box.astype(int)) in expected


def test_box_iou_matches_a_direct_count() -> None:
    rng = np.random.default_rng(1)
    a = np.sort(rng.integers(0, 20, (30, 2, 2)), axis=1).transpose(0, 2, 1).reshape(30, 4)[:, [0, 2, 1, 3]]
    b = np.sort(rng.integers(0, 20, (30, 2, 2)), axis=1).transpose(0, 2, 1).reshape(30, 4)[:, [0, 2, 1, 3]]
    a[:, 2:] += 1
    b[:, 2:] += 1
    for got, p, q in zip(box_iou(a.astype(np.float32), b.astype(np.float32)), a, b):
        grid_p = np.zeros((21, 21), bool)
        grid_q = np.zeros((21, 21), bool)
        grid_p[p[1]:p[3], p[0]:p[2]] = True
        grid_q[q[1]:q[3], q[0]:q[2]] = True
        assert got == pytest.approx((grid_p & grid_q).sum() / (grid_p | grid_q).sum())


def test_localise_only_boxed_maps_and_localised_flag() -> None:
    bigger = _two_blobs()
    bigger[6, 5] = 0.5
    up = torch.from_numpy(np.stack([bigger, bigger, bigger]))
    truth = torch.tensor([[5, 6, 10, 10], [0, 0, 3, 3], [float("nan")] * 4])
    located = localise(up, truth)
    assert located.iou[0] == pytest.approx(1.0) and located.iou[1] < 0.5 and np.isnan(located.iou[2])
    assert np.isnan(located.boxes[2]).all(), "no true box: not labelled"
    empty = localise(torch.zeros(1, 12, 12), truth[:1])
    assert np.isnan(empty.boxes).all() and empty.iou[0] == 0.0, "an empty map localises nothing"
    columns = wsl_columns(located, np.array([True, True, True]), np.array([True, True, True]),
                          np.array([True, True, True]))
    assert columns["localised"].tolist() == [True, False, pd.NA]
    wrong = wsl_columns(located, np.array([True, False, True]), np.array([False, True, True]),
                        np.array([True, True, True]))
    assert wrong["localised"].tolist() == [False, pd.NA, pd.NA], "predicted but wrong: not localised"


def test_pointing_tolerance_is_separate_from_the_energy_tolerance() -> None:
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = 1.0  # peak in the top-left cell (upsampled: within its 4 px)
    box = torch.tensor([[5.0, 5.0, 12.0, 12.0]])
    strict = cam.score_maps(maps, box, 16, tolerance=0.0, pointing=0.0)
    point = cam.score_maps(maps, box, 16, tolerance=0.0, pointing=5.0)
    assert strict.pointing_hit[0] == 0.0 and point.pointing_hit[0] == 1.0
    assert point.energy_in_box[0] == strict.energy_in_box[0], "the energy keeps its own tolerance"
    assert cam.pointing_tolerance(224) == 15.0 and cam.pointing_tolerance(96) == pytest.approx(15 * 96 / 224)


def _tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Three images of classes a, a, b with boxes; gradcam maps of three targets each."""
    predictions = pd.DataFrame({
        "image_id": ["i0", "i1", "i2"], "labels": [["a"], ["a"], ["b"]], "error": [None] * 3,
        "box_x0": [0.0, 0.0, 0.0], "top_classes": [["a", "b", "c"], ["b", "a", "c"], ["b", "c", "a"]],
        "correct": [True, False, True],
    })
    rows = []
    # (image, target, is_predicted, is_label, pointing_hit, map max, localised, iou)
    spec = [("i0", "a", True, True, True, 1.0, True, 0.7), ("i0", "b", False, False, False, 0.0, None, np.nan),
            ("i0", "c", False, False, False, 0.3, None, np.nan),
            ("i1", "a", False, True, False, 1.0, None, np.nan), ("i1", "b", True, False, True, 1.0, False, 0.1),
            ("i1", "c", False, False, False, 0.0, None, np.nan),
            ("i2", "b", True, True, True, 1.0, False, 0.4), ("i2", "c", False, False, False, 0.0, None, np.nan),
            ("i2", "a", False, False, False, 0.0, None, np.nan)]
    for image, target, pred, lab, hit, peak, loc, iou in spec:
        rows.append(dict(image_id=image, method="gradcam", layer="4", target=target, is_predicted=pred, is_label=lab,
                         pointing_hit=hit if peak else None, heatmap=np.array([0.0, peak], np.float32),
                         box_area_fraction=0.2, localised=loc, wsl_iou=iou))
    explanations = pd.DataFrame(rows)
    explanations["localised"] = explanations["localised"].astype("boolean")
    return predictions, explanations


def _value(rows, metric: str, class_name: str | None = None) -> tuple[float, int]:
    found = [r for r in rows if r.metric == metric and r.class_name == class_name]
    assert len(found) == 1, (metric, class_name)
    return found[0].value, found[0].images


def test_a_rate_needs_its_map_for_every_image_it_is_defined_on() -> None:
    """--targets predicted leaves the misclassified image without its true class's map, --targets
    true without its predicted class's: the rate would silently drop it from the denominator."""
    from visaudit.tasks.findings.localisation_rates import localisation_metric_rows

    predictions, explanations = _tables()
    metrics = lambda maps: {r.metric for r in localisation_metric_rows(predictions, maps, False)}  # noqa: E731
    assert {"pointing_rate", "wsl_error", "wsl_mean_iou"} <= metrics(explanations)
    only_predicted = metrics(explanations[explanations["is_predicted"]])
    assert "pointing_rate" not in only_predicted and "wsl_error" in only_predicted
    only_true = metrics(explanations[explanations["is_label"]])
    assert "wsl_error" not in only_true and "wsl_mean_iou" not in only_true and "pointing_rate" in only_true


def test_rates_by_hand_with_wilson_intervals_against_scipy() -> None:
    predictions, explanations = _tables()
    rows = localisation_metric_rows(predictions, explanations, multi_label=False)
    # pointing game on the true class's map: i0 hit, i1 miss, i2 hit
    assert _value(rows, "pointing_rate") == (pytest.approx(2 / 3), 3)
    assert _value(rows, "pointing_rate", "a") == (0.5, 2)
    ci = binomtest(2, 3).proportion_ci(confidence_level=0.95, method="wilson")
    assert _value(rows, "pointing_rate_low")[0] == pytest.approx(ci.low, abs=1e-6)
    assert _value(rows, "pointing_rate_high")[0] == pytest.approx(ci.high, abs=1e-6)
    # WSL on the predicted class's map: i0 localised, i1 wrong class, i2 IoU 0.4: error 2/3
    assert _value(rows, "wsl_error") == (pytest.approx(2 / 3), 3)
    assert _value(rows, "wsl_error", "b") == (1.0, 1)
    assert _value(rows, "wsl_mean_iou")[0] == pytest.approx((0.7 + 0.1 + 0.4) / 3)
    # top-5 (here all 3 classes): present classes hit when pointed (i0 a yes, i1 a no, i2 b yes);
    # absent classes hit when their map is empty (i0: b yes, c no; i1: b no, c yes; i2: c yes, a yes)
    assert _value(rows, "pointing_top5_rate") == (pytest.approx(6 / 9), 9)
    assert _value(rows, "pointing_top5_rate", "b") == (1.0, 3)


def test_top5_needs_every_top_class_map() -> None:
    predictions, explanations = _tables()
    partial = explanations[explanations["target"] != "c"]
    rows = localisation_metric_rows(predictions, partial, multi_label=False)
    assert not [r for r in rows if r.metric.startswith("pointing_top5")], "no top-5 maps: no top-5 rate"
    assert [r for r in rows if r.metric == "pointing_rate"]


def test_heatmaps_are_read_only_for_a_top5_rate() -> None:
    """A caller may leave the maps out of the frame: they are asked for only where the maps cover
    every image's top classes, and then give the same rows."""
    predictions, explanations = _tables()
    asked = []
    lean = explanations.drop(columns=["heatmap"])
    rows = localisation_metric_rows(predictions, lean, False, lambda: asked.append(1) or explanations["heatmap"])
    assert rows == localisation_metric_rows(predictions, explanations, False) and asked == [1]
    only_true = lean[lean["is_label"]].reset_index(drop=True)
    rows = localisation_metric_rows(predictions, only_true, False, lambda: asked.append(2) or explanations["heatmap"])
    assert [r for r in rows if r.metric == "pointing_rate"] and asked == [1], "no top-5 maps: never read"


def test_report_view_and_the_drawn_box() -> None:
    from visaudit.tasks.data.records import metric_frame
    from visaudit.tasks.explain.overlay import WSL_BOX_COLOUR, overlay_pixels
    from visaudit.tasks.report.localisation import localisation_view

    predictions, explanations = _tables()
    view = localisation_view(metric_frame(localisation_metric_rows(predictions, explanations, multi_label=False)))
    assert view is not None and view.top5
    overall = view.rows[0]
    ci = binomtest(2, 3).proportion_ci(method="wilson")
    assert (overall.class_name, overall.maps) == ("all classes", 3)
    assert overall.pointing == f"0.67 ({ci.low:.2f}-{ci.high:.2f})" and overall.mean_iou == "0.40"
    assert localisation_view(metric_frame([])) is None
    heat = np.zeros((4, 4), np.float32)
    drawn = overlay_pixels(heat, np.zeros((16, 16, 3)), 16, None, np.array([2.0, 3.0, 10.0, 12.0]))
    assert tuple(drawn[3, 6]) == WSL_BOX_COLOUR and tuple(drawn[7, 6]) != WSL_BOX_COLOUR


@pytest.mark.parametrize("arrow", [False, True], ids=["object-cells", "arrow-lists"])
def test_single_labels_as_the_per_cell_rule(arrow: bool) -> None:
    """A row's label when it has exactly one (a null item as "None"), else missing; any label at all."""
    cells = [np.array(["cat"]), None, np.array([], dtype=object), np.array(["dog", "cat"]), [None], ["dog"], ["cat"]]
    labels = pd.Series(cells, dtype=object)
    if arrow:
        labels = pd.Series(pd.arrays.ArrowExtensionArray(pa.array(cells, pa.list_(pa.string()), from_pandas=True)))
    truth, has_labels = _single_labels(labels)
    assert [None if pd.isna(v) else v for v in truth] == ["cat", None, None, None, "None", "dog", "cat"]
    assert has_labels.tolist() == [True, False, False, True, True, True, True]
    assert len(truth.categories) == 3
