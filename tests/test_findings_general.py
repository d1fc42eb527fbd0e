"""Detectors on data they were not tuned for: large boxes, group shifts, two-class shortcuts
that only the model follows, and messages whose every number comes from the row."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from visaudit.tasks.data.columns import class_matrix
from visaudit.tasks.data.schema import PROPERTY_COLUMNS
from visaudit.tasks.findings.attention_off_object import attention_off_object, normalised_excess
from visaudit.tasks.findings.compute import FindingInputs, Thresholds, detect_all
from visaudit.tasks.findings.confident_error import confident_errors
from visaudit.tasks.findings.confused_pair import confused_pairs
from visaudit.tasks.findings.group_gap import failing_groups, group_gap
from visaudit.tasks.findings.inputs import listed, sharing, stacked
from visaudit.tasks.findings.likely_label_error import likely_label_errors
from visaudit.tasks.findings.shortcut_property import shortcut_property
from visaudit.tasks.findings.slice_gap import slice_gap

BIRDS = ["landbird", "waterbird"]


def _maps(energy: np.ndarray, area: np.ndarray, target: str = "cat") -> tuple[pd.DataFrame, pd.DataFrame]:
    n = len(energy)
    ids = [f"m{k:03d}" for k in range(n)]
    audited = pd.DataFrame({"image_id": ids})
    explanations = pd.DataFrame({
        "image_id": ids, "method": "gradcam", "layer": "layer4", "target": target, "is_label": True,
        "energy_in_box": energy, "box_area_fraction": area, "pointing_hit": energy > area,
    })
    return audited, explanations


def test_normalised_excess_is_zero_for_uniform_and_one_for_all_inside() -> None:
    area = np.array([0.1, 0.5, 0.8])
    np.testing.assert_allclose(normalised_excess(area, area), 0.0)
    np.testing.assert_allclose(normalised_excess(np.ones(3), area), 1.0)


def test_a_large_box_does_not_make_an_object_model_look_off_object() -> None:
    rng = np.random.default_rng(0)
    area = rng.uniform(0.45, 0.6, 80)  # boxes covering half the image: the old lift of 1.5 was out of reach
    on_object = np.clip(area + rng.uniform(0.1, 0.35, 80), 0, 1)
    assert attention_off_object(*_maps(on_object, area), Thresholds()) == []
    elsewhere = np.clip(area - rng.uniform(0.05, 0.3, 80), 0, 1)
    (row,) = attention_off_object(*_maps(elsewhere, area), Thresholds())
    assert row.value == 0.0 and row.severity == "high" and "0 of 80 images" in row.message
    noisy = np.clip(area + rng.normal(0.0, 0.05, 80), 0, 1)  # no better, no worse than uniform: not surely worse
    assert attention_off_object(*_maps(noisy, area), Thresholds()) == []


def test_off_object_message_says_outside_only_when_the_energy_is() -> None:
    area = np.full(40, 0.7)
    (row,) = attention_off_object(*_maps(np.full(40, 0.6), area), Thresholds())  # 60% inside, a 70% box
    assert "mostly outside" not in row.message and "covers most of the image" in row.message
    (row,) = attention_off_object(*_maps(np.full(40, 0.1), np.full(40, 0.3)), Thresholds())
    assert "most of the map's energy lies outside the box" in row.message


def _birds(minority_right: tuple[float, float] = (0.05, 0.1), per_group: int = 40, seed: int = 0):
    """A balanced test split of two classes on two places; the minority groups (waterbird on
    land, landbird on water) are mostly wrong, confidently."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, place, right in (("landbird", "land", 1.0), ("waterbird", "water", 1.0),
                               ("waterbird", "land", minority_right[0]), ("landbird", "water", minority_right[1])):
        for _ in range(per_group):
            ok = rng.random() < right
            rows.append((name, place, ok))
    n = len(rows)
    audited = pd.DataFrame({
        "image_id": [f"b{k:03d}" for k in range(n)],
        "labels": [[c] for c, _, _ in rows],
        "predicted": [[c if ok else BIRDS[1 - BIRDS.index(c)]] for c, _, ok in rows],
        "confidence": rng.uniform(0.9, 1.0, n),
        "correct": [ok for _, _, ok in rows],
        "attributes": [[("place", p), ("batch", str(k % 2))] for k, (_, p, _) in enumerate(rows)],
        "image_width": 64, "image_height": 64, "error": None,
    })
    predicted = np.array([BIRDS.index(p[0]) for p in audited["predicted"]])
    probs = np.full((n, 2), 0.03)
    probs[np.arange(n), predicted] = 0.97
    signals = pd.DataFrame({"image_id": audited["image_id"], "probabilities": list(probs.astype(np.float32))})
    for name in PROPERTY_COLUMNS:  # properties unrelated to anything
        signals[name] = rng.uniform(0.2, 0.8, n).astype(np.float32)
    signals["embedding"] = list(rng.normal(size=(n, 16)).astype(np.float32))
    signals["thumbnail"] = list(rng.integers(0, 256, size=(n, 192)).astype(np.uint8))
    return audited, signals, rows


def test_group_gap_finds_the_minority_groups_that_slice_gap_cannot() -> None:
    audited, signals, rows = _birds()
    assert slice_gap(audited, pd.DataFrame(), Thresholds()) == []  # each place's accuracy is about average
    (row,) = group_gap(audited, pd.DataFrame(), Thresholds())  # one finding for one cause
    groups = failing_groups(audited, pd.DataFrame(), Thresholds())
    assert {(g.class_name, g.value) for g in groups} == {("waterbird", "land"), ("landbird", "water")}
    worst = groups[0]
    assert (row.class_name, row.slice) == (worst.class_name, f"place={worst.value}")
    right = [ok for c, p, ok in rows if (c, p) == (worst.class_name, worst.value)]
    assert worst.correct == sum(right) and worst.images == len(right)
    assert row.value == pytest.approx(1.0 - sum(right) / len(right))  # the class is always right elsewhere
    assert row.severity == "high" and f"{sum(right)} of {len(right)}" in row.message
    wrong = {i for i, (c, p, ok) in zip(audited["image_id"], rows) if not ok}
    assert set(row.evidence) <= wrong


def test_group_gap_is_silent_without_a_group_shift() -> None:
    audited, _, _ = _birds(minority_right=(1.0, 1.0))
    audited["correct"] = np.random.default_rng(3).random(len(audited)) > 0.1  # errors independent of place
    assert group_gap(audited, pd.DataFrame(), Thresholds()) == []


def test_label_errors_in_a_failing_group_are_called_a_group_shift() -> None:
    audited, signals, _ = _birds()
    rows = likely_label_errors(audited, signals, BIRDS, Thresholds())
    assert rows and all(r.severity == "low" and r.slice == "explained=group_gap" for r in rows)
    assert all("group shift, not wrong labels" in r.message for r in rows)
    assert all("fix their labels" not in r.message for r in rows)


def test_confident_errors_and_confusions_of_a_group_shift_are_one_cause() -> None:
    """The group shift's mistakes are not raised again per class (confident_error) and per
    pair (confused_pair): their rows are low and point at group_gap; away from groups they stay."""
    audited, signals, _ = _birds()
    rows = confident_errors(audited, signals, Thresholds()) + confused_pairs(audited, signals, Thresholds())
    assert {r.kind for r in rows} == {"confident_error", "confused_pair"}
    assert all(r.severity == "low" and r.slice == "explained=group_gap" and "group_gap" in r.message for r in rows)
    audited, signals, _ = _birds(minority_right=(1.0, 1.0))
    wrong = audited.sample(12, random_state=2).index  # errors spread over both places: no group fails
    audited.loc[wrong, "predicted"] = audited.loc[wrong, "labels"].map(lambda ls: [BIRDS[1 - BIRDS.index(ls[0])]])
    audited.loc[wrong, "correct"] = False
    rows = confident_errors(audited, signals, Thresholds()) + confused_pairs(audited, signals, Thresholds())
    assert rows and all(r.slice != "explained=group_gap" and "group_gap" not in r.message for r in rows)


def test_label_errors_outside_groups_are_still_label_errors() -> None:
    audited, signals, _ = _birds(minority_right=(1.0, 1.0))
    flipped = audited.sample(12, random_state=1).index  # the model is right; the given label is not
    for k in flipped:
        audited.at[k, "labels"] = [BIRDS[1 - BIRDS.index(audited.at[k, "labels"][0])]]
    audited["correct"] = [ls == ps for ls, ps in zip(audited["labels"], audited["predicted"])]
    rows = likely_label_errors(audited, signals, BIRDS, Thresholds())
    listed = {i for r in rows for i in r.evidence}
    assert listed == set(audited.loc[flipped, "image_id"]) and all(r.severity != "low" for r in rows)


def _two_class_property(labels_follow: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 200
    labels = np.repeat(BIRDS, n // 2)
    blue = rng.uniform(0, 1, n)
    predicted = np.where(blue > 0.5, "waterbird", "landbird")  # the model follows the blue
    if labels_follow:
        blue = np.where(labels == "waterbird", rng.uniform(0.6, 1, n), rng.uniform(0, 0.4, n))
        predicted = labels
    audited = pd.DataFrame({
        "image_id": [f"p{k:03d}" for k in range(n)], "labels": [[c] for c in labels],
        "predicted": [[c] for c in predicted], "image_width": 64, "image_height": 64, "error": None,
    })
    signals = pd.DataFrame({"image_id": audited["image_id"], "mean_b": blue.astype(np.float32)})
    for name in ("mean_r", "mean_g", "brightness", "contrast", "border_r", "border_g", "border_b"):
        signals[name] = rng.uniform(0.2, 0.8, n).astype(np.float32)
    return audited, signals, blue, predicted


def test_two_classes_get_one_shortcut_and_the_right_verdict() -> None:
    audited, signals, blue, predicted = _two_class_property(labels_follow=True)
    (row,) = shortcut_property(audited, signals, BIRDS, Thresholds())  # not once per class
    assert row.slice == "property=mean_b" and "the data has a shortcut" in row.message
    audited, signals, blue, predicted = _two_class_property(labels_follow=False)
    (row,) = shortcut_property(audited, signals, BIRDS, Thresholds())
    assert "the data has a shortcut" not in row.message and "labels of these images do not follow it" in row.message
    mine = predicted == row.class_name  # the medians quoted are of the predicted groups, and they differ
    assert f"median {np.median(blue[mine]):.3g}" in row.message and f"{np.median(blue[~mine]):.3g} for the rest" in row.message


NUMBER = re.compile(r"-?\d+(?:\.\d+)?%?")


def _as_fraction(token: str) -> float:
    return float(token[:-1]) / 100 if token.endswith("%") else float(token)


def test_every_message_quotes_its_own_value() -> None:
    """Across a run with many findings, each row's value appears in its message (as printed,
    to the message's precision): the message describes the number that raised it."""
    audited, signals, _ = _birds()
    energy = np.where(np.arange(len(audited)) % 2, 0.1, 0.15)
    explanations = _maps(energy, np.full(len(audited), 0.3), "landbird")[1].assign(image_id=audited["image_id"])
    found = detect_all(FindingInputs(audited, explanations, BIRDS, multi_label=False, layer="layer4", signals=signals),
                       Thresholds())
    assert {f.kind for f in found} >= {"group_gap", "attention_off_object", "likely_label_error"}
    for f in found:
        quoted = [_as_fraction(tok) for tok in NUMBER.findall(f.message)]
        assert any(abs(q - f.value) <= 0.0051 + 1e-9 for q in quoted), (f.kind, f.value, f.message)


def test_a_run_computes_shared_results_once_for_its_own_frames_only() -> None:
    """Within ``sharing`` (one findings run) a derived result is computed once per frames and
    thresholds, never handed to other frames, other thresholds or a later run."""
    audited, signals, _ = _birds()
    t = Thresholds()
    alone = failing_groups(audited, signals, t)
    with sharing():
        first = failing_groups(audited, signals, t)
        assert first == alone and failing_groups(audited, signals, t) is first
        assert failing_groups(audited.copy(), signals, t) is not first
        assert failing_groups(audited, signals, replace(t, slice_margin=0.99)) == []
    assert failing_groups(audited, signals, t) is not first


def test_sharing_leaves_every_finding_as_each_detector_computes_it_alone() -> None:
    audited, signals, _ = _birds()
    detectors = (slice_gap, group_gap, confident_errors, confused_pairs)  # all read the failing groups
    alone = [detect(audited, signals, Thresholds()) for detect in detectors]
    assert all(alone[1:])
    with sharing():
        assert [detect(audited, signals, Thresholds()) for detect in detectors] == alone


def test_list_cells_flatten_in_order_and_name_their_classes() -> None:
    cells = pd.Series([["b", "a"], None, np.array(["c"], dtype=object), [], float("nan"), ("a", "x")])
    rows, names = listed(cells)
    assert rows.tolist() == [0, 0, 2, 5, 5] and names.tolist() == ["b", "a", "c", "a", "x"]
    member = class_matrix(cells, ["a", "b", "c"])
    assert member.tolist() == [[True, True, False], [False] * 3, [False, False, True], [False] * 3, [False] * 3,
                               [True, False, False]]


def test_vector_columns_stack_alike_from_arrow_lists_and_array_cells() -> None:
    """The findings step reads the signals' vectors as Arrow lists; the detectors' tables hold
    array cells: both give the same matrix, row order and index kept, and a gap is an error."""
    vectors = np.arange(24, dtype=np.float32).reshape(6, 4)
    cells = pd.Series(list(vectors), index=[5, 3, 9, 0, 1, 2], name="embedding")
    arrow = pd.Series(pd.array(vectors.tolist(), dtype=pd.ArrowDtype(pa.list_(pa.float32()))), index=cells.index,
                      name="embedding")
    for column in (cells, arrow):
        assert np.array_equal(stacked(column, np.float64), vectors) and stacked(column, np.float64).dtype == np.float64
        assert np.array_equal(stacked(column.iloc[[4, 1]], np.float32), vectors[[4, 1]])
        assert stacked(column.iloc[:0], np.float32).shape[0] == 0
        assert np.array_equal(stacked(column, np.uint8, np.array([5, 0, 5, 2])), vectors[[5, 0, 5, 2]].astype(np.uint8))
    # parts read together: several Arrow chunks (one empty, one a slice), rows picked across them in any order
    table = pa.table({"v": pa.array(vectors.tolist(), pa.list_(pa.float32()))})
    parts = pa.concat_tables([table.slice(0, 2), table.slice(2, 0), table.slice(2, 3), table.slice(5)])
    chunked = parts.to_pandas(types_mapper=pd.ArrowDtype)["v"]
    assert chunked.array.__arrow_array__().num_chunks == 4
    assert np.array_equal(stacked(chunked, np.float32), vectors)
    assert np.array_equal(stacked(chunked, np.float32, np.array([5, 1, 3, 0, 4, 2, 4])), vectors[[5, 1, 3, 0, 4, 2, 4]])
    ragged = pd.Series(pd.array([[1.0, 2.0], [3.0]], dtype=pd.ArrowDtype(pa.list_(pa.float32()))), name="thumbnail")
    with pytest.raises(ValueError, match="'thumbnail' holds vectors of lengths \\[1, 2\\]"):
        stacked(ragged, np.float32)
    gap = pd.Series(pd.array([[1.0], None], dtype=pd.ArrowDtype(pa.list_(pa.float32()))), name="probabilities")
    with pytest.raises(ValueError, match="'probabilities' has 1 null cells"):
        stacked(gap, np.float32)
