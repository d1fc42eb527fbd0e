"""``error_slice``: a cluster of one class's images, found without metadata, where its errors concentrate.

Domino (Eyuboglu et al. 2022) finds slices a model fails on by clustering images in an
embedding space. Here each class's images are clustered on what they look like, not on
what the model makes of them: the audited model's own embedding puts its errors next to the
class it mistakes them for, so clusters there would hold errors by construction, also on
data with no slice at all. The view is the 8x8 thumbnail (``signals.thumbnail``, pixels in
[0, 1]) reduced by PCA to the components that keep 90% of its variance (at most 8), next to
the image properties (``PROPERTY_COLUMNS``), clustered by k-means (scikit-learn) into
k = clip(n / 20, 2, 6) clusters for a class of n images (a class of more than ``SAMPLE`` images: the
centres fitted on ``SAMPLE`` of them, evenly spaced, and every image assigned to its nearest). The clustering never sees the
errors, so each cluster's accuracy can be tested as a fixed slice would be: against the rest
of its class, with Newcombe's hybrid score interval for the difference (``stats``),
Bonferroni-corrected at ``slice_confidence`` over every cluster tested; a cluster fails when
the whole interval lies above ``slice_margin``. Clusters under ``min_group_images`` (or
whose class has fewer outside them) are not judged.

A failing cluster is described by the properties that set it apart: the standardised mean
difference d = (mean_cluster - mean_rest) / std_class of each property, those with |d| >= 0.5
quoted with their means. One finding per class, on its worst cluster. When metadata already
explains the same images (at least half of the cluster's errors lie in a failing
``group_gap`` group or a slice ``slice_gap`` flags) the cause is that finding's and this
detector stays silent (one cause, one finding).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from visaudit.tasks.data.schema import PROPERTY_COLUMNS
from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.group_gap import failing_groups
from visaudit.tasks.findings.inputs import evenly_spaced, shared, signal_rows, stacked, true_class
from visaudit.tasks.findings.slice_gap import slice_gap, slice_table
from visaudit.tasks.findings.stats import difference_interval
from visaudit.tasks.findings.thresholds import Thresholds, severity

IMAGES_PER_CLUSTER = 20  # k = clip(n / this, MIN_CLUSTERS, MAX_CLUSTERS)
MIN_CLUSTERS, MAX_CLUSTERS = 2, 6
THUMBNAIL_VARIANCE = 0.9  # PCA keeps the components holding this share of the thumbnails' variance ...
MAX_COMPONENTS = 8  # ... at most this many
SAMPLE = 20_000  # images of a class its principal axes and k-means centres are fitted on (evenly spaced; all when fewer)
CHUNK = 8_192  # thumbnails projected per step: two float64 temporaries of 12.6 MB (192-byte thumbnails)
DESCRIBED_D = 0.5  # a property describes a cluster when its standardised mean difference reaches this
EXPLAINED_SHARE = 0.5  # a cluster whose errors lie at least this much in metadata findings' images is theirs


@dataclass(frozen=True)
class ErrorCluster:
    """One failing cluster of a class and its comparison with the rest of the class."""

    class_name: str
    correct: int
    images: int
    correct_rest: int
    images_rest: int
    low: float  # interval of the gap (rest - cluster accuracy)
    high: float
    described: tuple[tuple[str, float, float, float], ...]  # (property, d, cluster mean, rest mean), largest |d| first
    image_ids: tuple[str, ...]  # the cluster's images, its errors first (most confident first)

    @property
    def gap(self) -> float:
        """Accuracy of the rest of the class minus the cluster's."""
        return self.correct_rest / self.images_rest - self.correct / self.images


def appearance(signals: pd.DataFrame, rows: np.ndarray | None = None) -> np.ndarray:
    """Each image's appearance features (of the images at row positions ``rows``, when given):
    the thumbnail's leading principal components, then its properties.

    The axes are fitted on at most ``SAMPLE`` evenly spaced thumbnails (all of a smaller
    class; from 1,920 of them on, scikit-learn fits them from their 192 x 192 covariance); every thumbnail
    is then gathered and projected, ``(x / 255 - mean) @ axes.T``, a chunk at a time, so memory
    holds no copy of the class's thumbnails, float64 or uint8."""
    from sklearn.decomposition import PCA

    thumbnails = signals["thumbnail"]
    rows = np.arange(len(signals)) if rows is None else rows
    sample = stacked(thumbnails, np.uint8, rows[evenly_spaced(len(rows), SAMPLE)]) / 255.0
    components = min(MAX_COMPONENTS, len(sample) - 1, sample.shape[1])
    pca = PCA(n_components=components, random_state=0).fit(sample)  # from 1,920 rows scikit-learn's own choice is the covariance
    keep = int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), THUMBNAIL_VARIANCE) + 1)
    axes = pca.components_[: min(keep, components)]
    scores = np.empty((len(rows), len(axes)))
    for start in range(0, len(rows), CHUNK):  # the class's thumbnails gathered a chunk at a time
        pixels = stacked(thumbnails, np.uint8, rows[start : start + CHUNK])
        scores[start : start + CHUNK] = (pixels / 255.0 - pca.mean_) @ axes.T
    properties = [signals[name].to_numpy() for name in PROPERTY_COLUMNS]  # views, not a float64 copy of every row
    return np.column_stack([scores, *(p[rows] for p in properties)])


def cluster_labels(features: np.ndarray) -> np.ndarray:
    """k-means clusters (k = clip(n / 20, 2, 6)) of one class's appearance features; a class of
    more than ``SAMPLE`` images has its centres fitted on ``SAMPLE`` evenly spaced ones, then
    every image goes to its nearest centre (the fit's memory and time then do not grow with n)."""
    from sklearn.cluster import KMeans

    k = int(np.clip(len(features) // IMAGES_PER_CLUSTER, MIN_CLUSTERS, MAX_CLUSTERS))
    means = KMeans(n_clusters=k, n_init=4, random_state=0)
    if len(features) <= SAMPLE:
        return means.fit_predict(features)
    return means.fit(features[evenly_spaced(len(features), SAMPLE)]).predict(features)


def _describe(properties: pd.DataFrame, inside: np.ndarray) -> tuple[tuple[str, float, float, float], ...]:
    """The properties whose standardised mean difference between the cluster and the rest reaches 0.5."""
    spread = properties.std(ddof=0).replace(0.0, np.nan)
    mean_in, mean_out = properties[inside].mean(), properties[~inside].mean()
    d = ((mean_in - mean_out) / spread).dropna()
    ranked = d[d.abs() >= DESCRIBED_D].abs().sort_values(ascending=False).index
    return tuple((str(p), float(d[p]), float(mean_in[p]), float(mean_out[p])) for p in ranked)


def _explained(audited: pd.DataFrame, signals: pd.DataFrame, t: Thresholds) -> set[str]:
    """Images that metadata findings already account for: failing groups' and flagged slices'."""
    ids = {i for g in failing_groups(audited, signals, t) for i in g.image_ids}
    flagged = [f.slice for f in slice_gap(audited, signals, t) if f.slice]
    if flagged:
        frame = slice_table(audited, signals)
        for label in flagged:
            name, value = label.split("=", 1)
            for column in (f"attr:{name}", f"derived:{name}"):
                if column in frame:
                    ids |= set(frame.loc[frame[column] == value, "image_id"])
    return ids


@shared
def error_clusters(audited: pd.DataFrame, signals: pd.DataFrame, t: Thresholds) -> list[ErrorCluster]:
    """Every cluster of a class surely weaker than the rest of its class, worst first (metadata-explained ones included)."""
    if "correct" not in audited:
        return []
    classes, positions = true_class(audited), signal_rows(audited, signals)
    keep = audited["correct"].notna().to_numpy() & classes.notna().to_numpy() & (positions >= 0)
    at = positions[keep]
    frame = pd.DataFrame({  # ``at``: each image's row of ``signals``, where its thumbnail is taken per class
        "image_id": audited["image_id"][keep].reset_index(drop=True),
        "class": pd.Categorical(classes[keep]),  # codes: no Python string per image
        "correct": audited["correct"][keep].astype(bool).to_numpy(), "confidence": audited["confidence"][keep].to_numpy(),
        **{name: signals[name].to_numpy()[at] for name in PROPERTY_COLUMNS},
    })
    codes = frame["class"].cat.codes.to_numpy()
    order = np.argsort(codes, kind="stable")  # each class's rows in their order, without a sorted copy of the frame
    bounds = np.searchsorted(codes[order], np.arange(len(frame["class"].cat.categories) + 1))
    correct_all = frame["correct"].to_numpy()
    candidates = []
    for code, name in enumerate(frame["class"].cat.categories):
        members = order[bounds[code] : bounds[code + 1]]
        if len(members) < 2 * t.min_group_images or correct_all[members].all():
            continue
        labels = cluster_labels(appearance(signals, at[members]))
        for cluster in np.unique(labels):
            inside = labels == cluster
            if inside.sum() >= t.min_group_images and (~inside).sum() >= t.min_group_images:
                candidates.append((str(name), members, inside))
    if not candidates:
        return []
    z = NormalDist().inv_cdf(1 - (1 - t.slice_confidence) / (2 * len(candidates)))
    found = []
    for name, members, inside in candidates:
        correct = correct_all[members]
        k1, n1, k2, n2 = (np.float64(v) for v in (correct[inside].sum(), inside.sum(),
                                                    correct[~inside].sum(), (~inside).sum()))
        low, high = difference_interval(k1, n1, k2, n2, z)
        if low <= t.slice_margin:
            continue
        rows = frame.iloc[members]
        ranked = rows[inside].sort_values(["correct", "confidence"], ascending=[True, False], kind="stable")
        found.append(ErrorCluster(name, int(k1), int(n1), int(k2), int(n2), float(low), float(high),
                                  _describe(rows[list(PROPERTY_COLUMNS)], inside), tuple(ranked["image_id"])))
    return sorted(found, key=lambda c: -c.gap)


def _words(described: tuple[tuple[str, float, float, float], ...]) -> str:
    """The describing properties in words, or that none sets the cluster apart."""
    if not described:
        return "No measured property (colour, brightness, contrast, border) sets them apart: look at the images"
    return "They differ from the rest in " + ", ".join(
        f"{p} ({'higher' if d > 0 else 'lower'}: mean {inside:.3g} against {rest:.3g}, d = {d:+.1f})"
        for p, d, inside, rest in described[:3]
    )


def error_slices(audited: pd.DataFrame, signals: pd.DataFrame, t: Thresholds) -> list[Finding]:
    """One finding per class with a failing cluster that metadata does not explain, on its worst cluster."""
    clusters = error_clusters(audited, signals, t)
    explained = _explained(audited, signals, t) if clusters else set()
    found = []
    for name in dict.fromkeys(c.class_name for c in clusters):
        mine = [c for c in clusters if c.class_name == name
                and np.isin(c.image_ids[: c.images - c.correct], list(explained)).mean() < EXPLAINED_SHARE]
        if not mine:
            continue
        worst = mine[0]
        total = (worst.correct + worst.correct_rest) / (worst.images + worst.images_rest)
        found.append(Finding(
            kind="error_slice",
            severity=severity(worst.gap, 0.2, 0.1),
            class_name=name,
            slice=f"cluster of {worst.images}",
            metric="cluster_accuracy_gap",
            value=worst.gap,
            threshold=t.slice_margin,
            message=(
                f"Without metadata, clustering the '{name}' images by appearance (thumbnails and image properties) "
                f"finds {len(mine)} cluster(s) where its errors concentrate. The worst holds {worst.images} images, "
                f"{worst.correct / worst.images:.0%} right ({worst.correct} of {worst.images}) against "
                f"{worst.correct_rest / worst.images_rest:.0%} for the rest of the class ({worst.correct_rest} of "
                f"{worst.images_rest}; gap {worst.gap:.0%}, interval {worst.low:.0%} to {worst.high:.0%} at "
                f"{t.slice_confidence:.0%}, corrected over the clusters tested; margin {t.slice_margin:.0%}); "
                f"'{name}' as a whole is {total:.0%} right. {_words(worst.described)}. The model "
                "fails on a kind of image of this class: look at the listed ones, name what they share, and "
                "collect or weight more of it (or record it as a manifest column, so that group_gap can test it)."
            ),
            evidence=tuple(worst.image_ids[: min(t.evidence, worst.images - worst.correct)]),
        ))
    return found


DETECTOR = Detector(
    kind="error_slice",
    detect=lambda tables, t: error_slices(tables.audited, tables.signals, t),
    needs=("signals",),
    multi_label=False,
    support="association",
)
