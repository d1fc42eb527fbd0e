"""``error_slice``: clusters of a class, found by appearance without metadata, where its errors concentrate."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from visaudit.tasks.data.schema import PROPERTY_COLUMNS
from visaudit.tasks.findings.compute import FindingInputs, Thresholds, detect_all
from visaudit.tasks.findings.error_slice import appearance, cluster_labels, error_clusters, error_slices

CLASSES = ["cat", "dog"]


def _tables(error_dark: float, error_bright: float, seed: int = 0, n: int = 120, dark_share: float = 0.3,
            place: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Two classes; about a third of each class's images are reddish (thumbnails R 200, B 60;
    the others R 60, B 200: no brightness or contrast tercile, which slice_gap tests, tells them
    apart), each image wrong with the probability of its kind. Returns audited, signals and the
    reddish mask."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(CLASSES, n // 2)
    dark = rng.random(n) < dark_share
    wrong = rng.random(n) < np.where(dark, error_dark, error_bright)
    level = np.where(dark[:, None], [200.0, 100.0, 60.0], [60.0, 100.0, 200.0]).repeat(64, axis=1)
    thumbs = np.clip(level + rng.normal(0, 12, (n, 192)), 0, 255).astype(np.uint8)
    ids = [f"s{k:03d}" for k in range(n)]
    audited = pd.DataFrame({
        "image_id": ids, "labels": [[c] for c in labels],
        "predicted": [[CLASSES[1 - CLASSES.index(c)] if w else c] for c, w in zip(labels, wrong)],
        "confidence": rng.uniform(0.6, 1.0, n), "correct": ~wrong, "image_width": 64, "image_height": 64,
        "attributes": [[("light", "red" if d else "blue")] if place else [("batch", "a")] for d in dark],
        "error": None,
    })
    signals = pd.DataFrame({"image_id": ids, "thumbnail": list(thumbs)})
    for name in PROPERTY_COLUMNS:
        signals[name] = rng.uniform(0.3, 0.7, n).astype(np.float32)
    for k, name in enumerate(("mean_r", "mean_g", "mean_b")):
        signals[name] = (thumbs[:, 64 * k: 64 * (k + 1)].mean(axis=1) / 255).astype(np.float32)
    probs = np.where(np.array([p[0] for p in audited["predicted"]])[:, None] == np.array(CLASSES), 0.9, 0.1)
    signals["probabilities"] = list(probs.astype(np.float32))
    signals["embedding"] = list(rng.normal(size=(n, 8)).astype(np.float32))
    return audited, signals, dark


def test_clusters_follow_appearance_not_errors() -> None:
    audited, signals, dark = _tables(0.8, 0.05)
    cats = signals[[ls[0] == "cat" for ls in audited["labels"]]]
    labels = cluster_labels(appearance(cats))
    mine = dark[:60]
    for cluster in np.unique(labels):  # every cluster is all dark or all bright
        assert len(set(mine[labels == cluster])) == 1


@pytest.mark.parametrize("arrow", [False, True], ids=["object-cells", "arrow-lists"])
def test_a_reddish_cluster_that_fails_is_found_described_and_quoted(arrow: bool) -> None:
    audited, signals, dark = _tables(0.8, 0.05)
    if arrow:  # as the findings step reads the signals: vectors as Arrow lists
        signals = pa.Table.from_pandas(signals, preserve_index=False).to_pandas(
            types_mapper=lambda kind: pd.ArrowDtype(kind) if pa.types.is_nested(kind) else None)
    rows = error_slices(audited, signals, Thresholds())
    assert {r.class_name for r in rows} == {"cat", "dog"}  # one finding per class, not one per cluster
    clusters = error_clusters(audited, signals, Thresholds())
    for row in rows:
        worst = next(c for c in clusters if c.class_name == row.class_name)
        ids = set(audited.loc[dark, "image_id"])
        assert set(worst.image_ids) <= ids  # the failing cluster is reddish images
        assert row.value == pytest.approx(worst.gap) and row.value > 0.5
        assert f"{worst.correct} of {worst.images}" in row.message and f"gap {row.value:.0%}" in row.message
        assert re.search(r"mean_r \(higher: mean 0\.7\d* against 0\.2\d*", row.message), row.message
        wrong = set(audited.loc[~audited["correct"], "image_id"])
        assert row.evidence and set(row.evidence) <= wrong & ids
        assert row.severity == "high"


@pytest.mark.parametrize("seed", range(4))
def test_clean_control_is_silent(seed: int) -> None:
    audited, signals, _ = _tables(0.12, 0.12, seed=seed)  # errors as frequent on reddish images as on the rest
    assert error_slices(audited, signals, Thresholds()) == []


def test_defers_to_group_gap_when_metadata_names_the_images() -> None:
    audited, signals, _ = _tables(0.8, 0.05, place=True)
    found = detect_all(FindingInputs(audited, pd.DataFrame(), CLASSES, multi_label=False, layer=None,
                                     signals=signals), Thresholds())
    kinds = {f.kind for f in found}
    assert "group_gap" in kinds or "slice_gap" in kinds
    assert "error_slice" not in kinds
    audited, signals, _ = _tables(0.8, 0.05)  # the same failure without the column: error_slice reports it
    found = detect_all(FindingInputs(audited, pd.DataFrame(), CLASSES, multi_label=False, layer=None,
                                     signals=signals), Thresholds())
    assert "error_slice" in {f.kind for f in found}


def test_label_errors_in_a_failing_cluster_are_not_called_wrong_labels() -> None:
    from visaudit.tasks.findings.likely_label_error import likely_label_errors

    audited, signals, dark = _tables(0.8, 0.05)
    predicted = np.array([p[0] for p in audited["predicted"]])
    signals["probabilities"] = list(np.where(predicted[:, None] == np.array(CLASSES), 0.98, 0.02).astype(np.float32))
    wrong = set(audited.loc[~audited["correct"], "image_id"])
    in_clusters = {i for c in error_clusters(audited, signals, Thresholds()) for i in c.image_ids}
    assert len(wrong & in_clusters) >= 0.7 * len(wrong)  # the confident mistakes are the clusters'
    rows = likely_label_errors(audited, signals, CLASSES, Thresholds())
    assert rows and all(r.severity == "low" and r.slice == "explained=error_slice" for r in rows)
    assert all("look alike" in r.message and "fix their labels" not in r.message for r in rows)


def test_a_class_larger_than_the_sample_is_clustered_from_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A class of more than ``SAMPLE`` images: its PCA axes and k-means centres are fitted on
    ``SAMPLE`` evenly spaced images and every image goes to its nearest centre; the planted
    reddish clusters are found as they are from the whole class."""
    from visaudit.tasks.findings import error_slice

    audited, signals, dark = _tables(0.8, 0.05, n=400)
    cats = signals[[ls[0] == "cat" for ls in audited["labels"]]]
    whole = error_clusters(audited, signals, Thresholds())
    monkeypatch.setattr(error_slice, "SAMPLE", 50)  # each class has 200 images
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    fitted: list[tuple[str, int]] = []
    for kind in (KMeans, PCA):
        def spy(self, x, *args, _fit=kind.fit, _name=kind.__name__, **kwargs):  # type: ignore[no-untyped-def]
            fitted.append((_name, len(x)))
            return _fit(self, x, *args, **kwargs)
        monkeypatch.setattr(kind, "fit", spy)
    sampled = error_clusters(audited, signals, Thresholds())  # outside ``sharing``: computed again
    assert sorted(fitted) == [("KMeans", 50)] * 2 + [("PCA", 50)] * 2  # each class's fits saw the sample only
    labels = cluster_labels(appearance(cats))
    assert len(np.unique(labels)) == 6  # k from the class's 200 images, not the sample's 50
    for cluster in np.unique(labels):  # every cluster still all reddish or all blue
        assert len(set(dark[:200][labels == cluster])) == 1
    reddish = set(audited.loc[dark, "image_id"])
    for found in (whole, sampled):
        assert {c.class_name for c in found} == {"cat", "dog"}
        assert all(set(c.image_ids) <= reddish and c.gap > 0.5 for c in found)
