"""The dataset and attention detectors on generated tables: each fires on its planted signal,
stays quiet on the same data without it, and its statistics match references."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from visaudit.tasks.data.schema import PROPERTY_COLUMNS
from visaudit.tasks.explain.signals import image_properties, thumbnails
from visaudit.tasks.findings.colour_shortcut import colour_shortcuts
from visaudit.tasks.findings.compute import FindingInputs, Thresholds, compute_findings
from visaudit.tasks.findings.fixed_location import (
    RADIUS,
    _neighbour_counts,
    location_candidates,
    most_constant_patch,
    probe_location,
)
from visaudit.tasks.findings.inputs import embedding_rows
from visaudit.tasks.findings.likely_label_error import likely_label_errors
from visaudit.tasks.findings.near_duplicate import near_duplicates
from visaudit.tasks.findings.shortcut_property import one_feature_balanced_accuracy, shortcut_property, stratified_folds
from visaudit.tasks.findings.slice_gap import slice_gap
from visaudit.tasks.findings.stats import difference_interval

CLASSES = ["cat", "dog", "fox"]


def _audit(n_per_class: int = 60, seed: int = 0, attributes=None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = [c for c in CLASSES for _ in range(n_per_class)]
    n = len(labels)
    return pd.DataFrame(
        {
            "image_id": [f"i{k:04d}" for k in range(n)],
            "uri": [f"/data/{k}.png" for k in range(n)],
            "labels": [[c] for c in labels],
            "predicted": [[c] for c in labels],
            "confidence": rng.uniform(0.7, 1.0, n),
            "correct": True,
            "image_width": 64,
            "image_height": 64,
            "attributes": attributes if attributes is not None else [[("site", "a")]] * n,
            "error": None,
        }
    )


def _signals(audited: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(audited)
    frame = pd.DataFrame({"image_id": audited["image_id"]})
    for name in PROPERTY_COLUMNS:
        frame[name] = rng.uniform(0.2, 0.8, n).astype(np.float32)
    index = [CLASSES.index(ls[0]) for ls in audited["labels"]]
    probs = np.full((n, len(CLASSES)), 0.02)
    probs[np.arange(n), index] = 0.96
    frame["probabilities"] = list(probs.astype(np.float32))
    frame["embedding"] = list(rng.normal(size=(n, 16)).astype(np.float32))
    frame["thumbnail"] = list(rng.integers(0, 256, size=(n, 192)).astype(np.uint8))
    return frame


def _as_arrow(signals: pd.DataFrame) -> pd.DataFrame:
    """The signals as the findings step reads them: vector columns as Arrow lists (no object per cell)."""
    nested = lambda kind: pd.ArrowDtype(kind) if pa.types.is_nested(kind) else None  # noqa: E731
    return pa.Table.from_pandas(signals, preserve_index=False).to_pandas(types_mapper=nested)


# ----------------------------------------------------------------------------- signals


def test_image_properties_and_thumbnails_match_numpy() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    props = image_properties(torch.from_numpy(pixels))
    x = pixels.astype(np.float64) / 255
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    np.testing.assert_allclose(props["mean_g"].numpy(), x[:, 1].mean(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(props["brightness"].numpy(), luma.mean(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(props["contrast"].numpy(), luma.reshape(3, -1).std(axis=1, ddof=1), atol=1e-5)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    np.testing.assert_allclose(props["border_r"].numpy(), x[:, 0][:, border].mean(axis=1), atol=1e-6)
    thumbs = thumbnails(torch.from_numpy(pixels)).numpy()
    expected = pixels.astype(np.float64).reshape(3, 3, 8, 4, 8, 4).mean(axis=(3, 5)).round().reshape(3, -1)
    np.testing.assert_allclose(thumbs, expected, atol=1)


# ----------------------------------------------------------------------------- shortcut_property


def test_one_feature_classifier_scores_separable_and_random_features() -> None:
    rng = np.random.default_rng(0)
    members = np.zeros((300, 3), bool)
    members[np.arange(300), np.repeat([0, 1, 2], 100)] = True
    separable = np.where(members[:, 0], 1.0, 0.0) + rng.normal(0, 0.05, 300)
    scores = one_feature_balanced_accuracy(separable, members)
    assert scores[0] > 0.95
    noise = one_feature_balanced_accuracy(rng.normal(size=300), members)
    assert np.all(np.abs(noise - 0.5) < 0.12)


def _held_out_balanced_accuracy(x: np.ndarray, members: np.ndarray, fold: np.ndarray, bins: int) -> np.ndarray:
    """The classifier written out plainly: each held-out image's (N, K) prediction from its fold's bins."""
    predicted = np.zeros(members.shape, dtype=bool)
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        edges = np.unique(np.quantile(x[train], np.linspace(0, 1, bins + 1)[1:-1]))
        train_bin, test_bin = np.searchsorted(edges, x[train], side="right"), np.searchsorted(edges, x[test], side="right")
        for k in range(members.shape[1]):
            prior = members[train, k].mean()
            for b in range(len(edges) + 1):
                in_bin = train_bin == b
                rate = (members[train, k][in_bin].sum() + prior) / (in_bin.sum() + 1.0)
                predicted[np.flatnonzero(test)[test_bin == b], k] = rate > prior
    tpr = (predicted & members).sum(axis=0) / np.maximum(members.sum(axis=0), 1)
    tnr = (~predicted & ~members).sum(axis=0) / np.maximum((~members).sum(axis=0), 1)
    return 0.5 * (tpr + tnr)


@pytest.mark.parametrize("multi_label", [False, True], ids=["multi-class", "multi-label"])
def test_one_feature_classifier_counts_per_bin_as_the_plain_classifier_predicts(multi_label: bool) -> None:
    rng = np.random.default_rng(4)
    n, k = 400, 4
    if multi_label:
        members = rng.random((n, k)) < 0.3
    else:
        members = np.zeros((n, k), bool)
        members[np.arange(n), rng.integers(0, k, n)] = True
        members[rng.random(n) < 0.05] = False  # images of no class
    for x in (rng.normal(size=n), np.round(rng.normal(size=n)), members[:, 1] + rng.normal(0, 0.4, n)):
        fold = stratified_folds(members, seed=3)
        assert sorted(np.bincount(fold).tolist()) == [80] * 5
        expected = _held_out_balanced_accuracy(x, members, fold, bins=9)
        np.testing.assert_allclose(one_feature_balanced_accuracy(x, members, bins=9, seed=3), expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(one_feature_balanced_accuracy(x, members, bins=9, fold=fold), expected, rtol=0, atol=1e-12)


def test_shortcut_property_names_the_class_and_property() -> None:
    audited = _audit()
    signals = _signals(audited)
    is_dog = audited["labels"].map(lambda ls: ls[0] == "dog").to_numpy()
    signals.loc[is_dog, "border_b"] = np.random.default_rng(2).uniform(0.75, 0.95, is_dog.sum()).astype(np.float32)
    signals.loc[~is_dog, "border_b"] = np.random.default_rng(3).uniform(0.1, 0.7, (~is_dog).sum()).astype(np.float32)
    rows = shortcut_property(audited, signals, CLASSES, Thresholds())
    assert [(r.class_name, r.slice) for r in rows] == [("dog", "property=border_b")]
    assert rows[0].value > 0.9 and rows[0].severity == "high"
    assert set(rows[0].evidence) <= set(audited.loc[is_dog, "image_id"])
    assert shortcut_property(audited, _signals(audited, seed=5), CLASSES, Thresholds()) == []


# ----------------------------------------------------------------------------- slice_gap


def test_newcombe_interval_matches_the_paper() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, Table II example (c): 56/70 - 48/80, method 10.
    low, high = difference_interval(np.float64(48), np.float64(80), np.float64(56), np.float64(70), 1.959964)
    assert low == pytest.approx(0.0524, abs=5e-4) and high == pytest.approx(0.3339, abs=5e-4)


def test_slice_gap_flags_a_weak_site_and_not_a_neutral_one() -> None:
    rng = np.random.default_rng(4)
    site = rng.choice(["north", "south"], size=180, p=[0.7, 0.3])
    audited = _audit(attributes=[[("site", s), ("batch", str(k % 2))] for k, s in enumerate(site)])
    weak = (site == "south") & (rng.random(180) < 0.4)
    audited["correct"] = ~weak
    rows = slice_gap(audited, _signals(audited), Thresholds())
    assert [r.slice for r in rows] == ["site=south"]
    assert rows[0].value == pytest.approx(1 - audited["correct"][site == "south"].mean(), abs=1e-9)
    assert set(rows[0].evidence) <= set(audited.loc[weak, "image_id"])
    audited["correct"] = rng.random(180) > 0.1  # errors independent of every attribute
    assert slice_gap(audited, _signals(audited), Thresholds()) == []


# ----------------------------------------------------------------------------- likely_label_error


@pytest.mark.parametrize("arrow", [False, True], ids=["object-cells", "arrow-lists"])
def test_label_errors_recall_flipped_labels(arrow: bool) -> None:
    audited = _audit()
    signals = _as_arrow(_signals(audited)) if arrow else _signals(audited)
    flipped = audited.sample(18, random_state=0).index
    for k in flipped:
        given = audited.at[k, "labels"][0]
        audited.at[k, "labels"] = [CLASSES[(CLASSES.index(given) + 1) % 3]]
    rows = likely_label_errors(audited, signals, CLASSES, Thresholds())
    listed = {i for r in rows for i in r.evidence}
    assert listed == set(audited.loc[flipped, "image_id"])
    assert all(r.slice.startswith("suggested=") for r in rows)


def _calibrated(n: int = 600, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """A clean control: each image's probabilities, its label drawn from them (a calibrated
    model on right labels), so the model is wrong on ~15% and confident learning flags many."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 3, n)
    probs = rng.dirichlet([0.3, 0.3, 0.3], n) * 0.4
    probs[np.arange(n), true] += 0.6
    given = np.array([rng.choice(3, p=p / p.sum()) for p in probs])
    audited = _audit(n_per_class=n // 3)
    audited["labels"] = [[CLASSES[k]] for k in given]
    signals = _signals(audited)
    signals["probabilities"] = list(probs.astype(np.float32))
    return audited, signals, probs


def test_label_surprise_expectation_matches_simulated_right_labels() -> None:
    from visaudit.tasks.findings.likely_label_error import label_surprise

    _, _, probs = _calibrated()
    rng = np.random.default_rng(1)
    cumulative = probs.cumsum(axis=1) / probs.sum(axis=1, keepdims=True)
    draws = (rng.random((2000, len(probs), 1)) > cumulative[None]).sum(axis=2)  # labels drawn from the probabilities
    counts = (np.take_along_axis(probs[None].repeat(2000, 0), draws[..., None], 2)[..., 0] <= 0.05).sum(axis=1)
    surprise = label_surprise(draws[0], probs, 0.05)
    assert surprise.expected == pytest.approx(counts.mean(), rel=0.03)
    assert surprise.observed == counts[0]
    from scipy.stats import poisson
    assert surprise.p_value == pytest.approx(poisson.sf(counts[0] - 1, surprise.expected))


def test_label_errors_silent_on_clean_labels_that_the_model_gets_wrong() -> None:
    from cleanlab.filter import find_label_issues

    audited, signals, probs = _calibrated()
    given = np.array([CLASSES.index(ls[0]) for ls in audited["labels"]])
    assert find_label_issues(given, probs / probs.sum(1, keepdims=True), n_jobs=1).mean() > 0.05  # cleanlab alone flags them
    assert likely_label_errors(audited, signals, CLASSES, Thresholds()) == []
    flipped = audited.sample(60, random_state=3).index  # then 10% of the labels flipped: label noise, found
    for k in flipped:
        audited.at[k, "labels"] = [CLASSES[(CLASSES.index(audited.at[k, "labels"][0]) + 1) % 3]]
    rows = likely_label_errors(audited, signals, CLASSES, Thresholds())
    listed = {i for r in rows for i in r.evidence}
    assert rows and len(listed & set(audited.loc[flipped, "image_id"])) >= 0.6 * len(flipped)
    for r in rows:
        observed, expected = re.search(r"across the run (\d+) given labels .* predict (\d+\.\d)", r.message).groups()
        assert int(observed) > float(expected) and f"{r.value:.1%}" in r.message



def test_label_noise_in_one_class_raises_no_row_on_the_clean_ones() -> None:
    audited, signals, probs = _calibrated()
    given = np.array([CLASSES.index(ls[0]) for ls in audited["labels"]])
    rng = np.random.default_rng(5)
    flipped = np.flatnonzero((given == 0) & (rng.random(len(given)) < 0.3))  # only images labelled cat
    for k in flipped:
        audited.at[audited.index[k], "labels"] = [CLASSES[2]]  # ... relabelled fox
    rows = likely_label_errors(audited, signals, CLASSES, Thresholds())
    assert [r.class_name for r in rows] == [CLASSES[2]]  # cat and dog: no excess of their own, no row
    observed, expected = re.search(r"(\d+) of them in 'fox' against (\d+\.\d) predicted", rows[0].message).groups()
    assert int(observed) > float(expected)


# ----------------------------------------------------------------------------- near_duplicate


@pytest.mark.parametrize("layout", ["object-cells", "arrow-lists", "embeddings-read-apart"])
def test_near_duplicates_within_and_across_splits(layout: str) -> None:
    audited = _audit(n_per_class=20, attributes=[[("split", "test")]] * 60)
    signals = _signals(audited)
    rng = np.random.default_rng(6)
    noisy = lambda t: np.clip(t.astype(int) + rng.integers(-2, 3, t.shape), 0, 255).astype(np.uint8)  # noqa: E731
    signals.at[1, "thumbnail"] = noisy(signals.at[0, "thumbnail"])
    signals.at[11, "thumbnail"] = noisy(signals.at[10, "thumbnail"])
    flat = np.full(192, 128, np.uint8)  # plain images: an 8x8 thumbnail cannot tell them apart ...
    signals.at[2, "thumbnail"], signals.at[3, "thumbnail"] = noisy(flat), noisy(flat)  # ... and the model sees them apart
    signals.at[5, "thumbnail"] = noisy(signals.at[4, "thumbnail"])  # detailed copy, embeddings disagree: still a pair
    for copy, original in ((1, 0), (11, 10)):  # a copy's embedding is the original's, slightly perturbed
        signals.at[copy, "embedding"] = signals.at[original, "embedding"] + rng.normal(0, 0.01, 16).astype(np.float32)
    audited.at[11, "attributes"] = [("split", "train")]
    read: list[str] = []

    def embeddings(ids):  # as the findings step reads them: only the compared images' rows
        read.extend(ids)
        return embedding_rows(signals, ids)

    if layout == "embeddings-read-apart":
        found = near_duplicates(audited, _as_arrow(signals.drop(columns=["embedding"])), Thresholds(), embeddings)
        assert 0 < len(read) <= 8, "only the images of candidate pairs"
    else:
        found = near_duplicates(audited, _as_arrow(signals) if layout == "arrow-lists" else signals, Thresholds())
    rows = {r.slice: r for r in found}
    assert set(rows) == {"leakage", "within split"}
    assert rows["leakage"].evidence == ("i0010", "i0011") and rows["leakage"].severity == "high"
    assert rows["within split"].evidence == ("i0000", "i0001", "i0004", "i0005")  # not 2-3: flat and disagreeing
    assert "different labels" not in rows["within split"].message  # both images of each pair are 'cat'
    assert "in 1 pairs the model's embeddings disagree" in rows["within split"].message
    assert "embeddings disagree" not in rows["leakage"].message
    assert near_duplicates(audited, _signals(audited), Thresholds()) == []


@pytest.mark.parametrize("arrow", [False, True], ids=["object-cells", "arrow-lists"])
def test_near_duplicates_without_embeddings_rest_on_the_thumbnails(arrow: bool) -> None:
    """No embeddings (a TorchScript model has no layer to read them from): a detailed thumbnail
    match stands, a low-detail one is not confirmed, and no label or instability claim is made."""
    audited = _audit(n_per_class=20)
    signals = _signals(audited).assign(embedding=[np.zeros(0, np.float32)] * 60)
    rng = np.random.default_rng(6)
    noisy = lambda t: np.clip(t.astype(int) + rng.integers(-2, 3, t.shape), 0, 255).astype(np.uint8)  # noqa: E731
    signals.at[1, "thumbnail"] = noisy(signals.at[0, "thumbnail"])
    signals.at[25, "thumbnail"] = noisy(signals.at[0, "thumbnail"])  # another class: a label claim needs embeddings
    flat = np.full(192, 128, np.uint8)
    signals.at[2, "thumbnail"], signals.at[3, "thumbnail"] = noisy(flat), noisy(flat)
    (row,) = near_duplicates(audited, _as_arrow(signals) if arrow else signals, Thresholds())
    assert set(row.evidence) == {"i0000", "i0001", "i0025"} and row.value == 3
    assert "no model embeddings to compare" in row.message and "nan" not in row.message
    assert "different labels" not in row.message and "embeddings disagree" not in row.message


# ----------------------------------------------------------------------------- unfaithful_explanation


def test_unfaithful_class_marks_its_attention_findings_low_confidence() -> None:
    audited = _audit(n_per_class=10)
    explanations = pd.DataFrame({
        "image_id": audited["image_id"], "method": "gradcam", "layer": "l4",
        "target": [ls[0] for ls in audited["labels"]], "is_label": True,
        "energy_in_box": 0.1, "box_area_fraction": 0.2, "pointing_hit": False,
        "peak_x": np.nan, "peak_y": np.nan,
    })
    occlusion = pd.DataFrame({
        "image_id": audited["image_id"], "target": [ls[0] for ls in audited["labels"]], "is_label": True,
        "gradcam_spearman": [0.05 if ls[0] == "fox" else 0.7 for ls in audited["labels"]],
    })
    findings = compute_findings(FindingInputs(audited, explanations, CLASSES, multi_label=False, layer="l4",
                                              occlusion=occlusion), Thresholds())
    unfaithful = findings[findings["kind"] == "unfaithful_explanation"]
    assert list(unfaithful["class_name"]) == ["fox"] and unfaithful["value"].iloc[0] == pytest.approx(0.05)
    attention = findings[findings["kind"] == "attention_off_object"].set_index("class_name")
    assert attention.loc["fox", "confidence"] == "low" and "Low confidence" in attention.loc["fox", "message"]
    assert attention.loc["cat", "confidence"] == "normal"
    sanity = pd.DataFrame({"metric": "sanity_spearman", "method": "gradcam", "detail": ["1:fc", "2:fc+l4"],
                           "value": [0.9, 0.8]})
    findings = compute_findings(FindingInputs(audited, explanations, CLASSES, multi_label=False, layer="l4",
                                              metrics=sanity), Thresholds())
    assert (findings.loc[findings["kind"] == "attention_off_object", "confidence"] == "low").all()
    assert findings.loc[findings["kind"] == "unfaithful_explanation", "value"].tolist() == [0.8]


# ----------------------------------------------------------------------------- attention_fixed_location


class CornerReader(torch.nn.Module):
    """Class 0's score is the mean of a 6x6 corner patch: a model that reads a mark."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = 20 * x[:, :, 3:9, 3:9].mean(dim=(1, 2, 3))
        return torch.stack([corner, torch.ones_like(corner)], dim=1)


def _marked_images(n: int = 16, centred_blob: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 48, 48, generator=generator)
    if centred_blob:  # the same place, but content (colour, size) varies
        colours = torch.randn(n, 3, 1, 1, generator=generator) * 2
        images[:, :, 18:30, 18:30] = colours + 0.3 * torch.randn(n, 3, 12, 12, generator=generator)
    else:
        images[:, :, 3:9, 3:9] = 2.0
    return images


def test_constant_mark_is_found_and_its_muting_is_decisive() -> None:
    images = _marked_images()
    x, y, side, ratio = most_constant_patch(images, 0.25, 0.25)
    assert abs(x - 6 / 48) <= 3 / 48 and abs(y - 6 / 48) <= 3 / 48 and ratio < 0.1
    probe = probe_location(CornerReader(), images, 0, 0.25, 0.25)
    assert probe.drop > 0.4 and probe.control_drop < 0.05 and probe.flip_share == 1.0


def test_centred_objects_are_not_constant_content() -> None:
    _, _, _, ratio = most_constant_patch(_marked_images(centred_blob=True), 0.5, 0.5)
    assert ratio > Thresholds().fixed_location_patch_ratio


def test_location_candidates_need_clustered_peaks() -> None:
    audited = _audit(n_per_class=20)
    rng = np.random.default_rng(7)
    targets = [ls[0] for ls in audited["labels"]]
    peaks = np.where(np.array(targets)[:, None] == "cat", [0.1, 0.1] + rng.normal(0, 0.02, (60, 2)),
                     rng.uniform(0, 1, (60, 2)))
    explanations = pd.DataFrame({"image_id": audited["image_id"], "method": "gradcam", "target": targets,
                                 "is_label": True, "peak_x": peaks[:, 0], "peak_y": peaks[:, 1]})
    candidates = location_candidates(audited, explanations, Thresholds())
    assert [c.class_name for c in candidates] == ["cat"]
    assert abs(candidates[0].x - 0.1) < 0.03 and candidates[0].share >= 0.9


def test_neighbour_counts_in_row_chunks_equal_the_whole_matrix() -> None:
    """Peaks on a coarse grid (ties at exactly RADIUS included) counted in chunks of 7 rows."""
    xy = np.random.default_rng(3).integers(0, 9, (100, 2)) / 8.0
    whole = (np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1)) <= RADIUS).sum(axis=1)
    assert np.array_equal(_neighbour_counts(xy, rows=7), whole) and whole.max() > 1
    assert len(_neighbour_counts(np.zeros((0, 2)))) == 0


# ----------------------------------------------------------------------------- colour_shortcut


def _impressions(colours: dict[str, tuple[tuple[int, int, int], float]]) -> pd.DataFrame:
    return pd.DataFrame([
        {"class_name": name, "class_index": CLASSES.index(name), "colour_r": rgb[0], "colour_g": rgb[1],
         "colour_b": rgb[2], "colour_probability": probability}
        for name, (rgb, probability) in colours.items()
    ])


def test_colour_shortcut_tells_a_background_from_a_colour_cue() -> None:
    audited = _audit(n_per_class=20)
    signals = _signals(audited)
    is_dog = audited["labels"].map(lambda ls: ls[0] == "dog").to_numpy()
    blue = np.array([30, 60, 230]) / 255
    for k, channel in enumerate(("border_r", "border_g", "border_b")):
        signals.loc[is_dog, channel] = (blue[k] + np.random.default_rng(k).normal(0, 0.02, is_dog.sum())).astype(np.float32)
    # fox is given the same blue, but its images' borders are no nearer it than the others' (dog's are)
    impressions = _impressions({"cat": ((200, 20, 20), 0.5), "dog": ((30, 60, 230), 0.95), "fox": ((30, 60, 230), 0.93)})
    findings = compute_findings(FindingInputs(audited, pd.DataFrame(), CLASSES, multi_label=False, layer=None,
                                              signals=signals, impressions=impressions), Thresholds())
    colour = findings[findings["kind"] == "colour_shortcut"].set_index("class_name")
    assert list(colour.index) == ["dog", "fox"]  # cat's colour gives 0.5 < 0.9: nothing
    dog, fox = colour.loc["dog"], colour.loc["fox"]
    assert dog["severity"] == "medium" and dog["value"] == pytest.approx(0.95) and dog["threshold"] == 0.9
    assert dog["metric"] == "colour_probability" and dog["slice"] == "rgb=(30, 60, 230)"
    assert dog["message"].startswith(
        "A plain image of one colour (RGB 30, 60, 230), with no object at all, is called dog with probability 0.95: "
        "the model takes that colour as evidence for the class. The class's 20 images have borders nearer that "
        "colour than the other 40 (median RGB distance ")
    assert dog["message"].endswith(": a background shortcut in the data.")
    assert len(dog["evidence"]) == 8 and set(dog["evidence"]) <= set(audited.loc[is_dog, "image_id"])
    assert fox["severity"] == "low" and fox["message"].endswith(": a colour cue, not the background.")
    assert "not clearly nearer that colour than the others'" in fox["message"]
    strict = compute_findings(FindingInputs(audited, pd.DataFrame(), CLASSES, multi_label=False, layer=None,
                                            signals=signals, impressions=impressions),
                              Thresholds(colour_shortcut_probability=0.99, colour_nearer_borders=0.01))
    assert not (strict["kind"] == "colour_shortcut").any()


def test_colour_shortcut_without_border_data_says_only_the_colour() -> None:
    audited = _audit(n_per_class=20)
    impressions = _impressions({"dog": ((30, 60, 230), 0.95)})
    found = colour_shortcuts(audited, impressions, pd.DataFrame(), Thresholds())
    assert len(found) == 1 and found[0].severity == "low" and found[0].evidence == ()
    assert found[0].message == ("A plain image of one colour (RGB 30, 60, 230), with no object at all, is called dog "
                                "with probability 0.95: the model takes that colour as evidence for the class.")
    no_colours = impressions.assign(colour_probability=np.nan)
    assert colour_shortcuts(audited, no_colours, pd.DataFrame(), Thresholds()) == []
    assert colour_shortcuts(audited, impressions.drop(columns="colour_probability"), pd.DataFrame(), Thresholds()) == []
