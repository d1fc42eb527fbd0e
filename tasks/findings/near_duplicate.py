"""``near_duplicate``: pairs of near-identical images, and leakage across splits.

It compares 8x8 thumbnails of the model input (``signals.thumbnail``) by RMS difference
(at most ``duplicate_pixel_rms``), and reports the pairs' embedding similarity beside it;
a pair that crosses the ``split`` attribute (train/test) is leakage. Thumbnails find the
pairs: on the demo, the penultimate embeddings of distinct images come closer than those
of an image and its JPEG re-encode, while thumbnails keep them ten times apart. The
embeddings can veto a low-detail match: plain images (flat backgrounds, small objects) can
share an 8x8 thumbnail while the model sees them differently (distinct images drawn with
separate seeds, cosine ~0.5), so a pair of thumbnails that vary less than
``duplicate_min_detail`` (pixel standard deviation) needs embedding cosine similarity of at
least ``duplicate_min_cosine`` too. A match of detailed thumbnails stands on its own: a model
that was not trained to be robust can see a JPEG copy of a training image very differently
(cosine 0.22 and 0.73 for two of five leaked copies, measured on the planted-bias test's
plainly trained 64-px model), and leakage must not hide behind that; the message then says
the embeddings disagree. Only pairs whose embeddings agree back the claim that a label is wrong.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from visaudit.tasks.data.sources import attribute_pairs
from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.inputs import Embeddings, embedding_rows, evenly_spaced, signal_rows, stacked
from visaudit.tasks.findings.thresholds import Thresholds, severity

if TYPE_CHECKING:
    from scipy.spatial import cKDTree

MAX_PAIRS = 100_000  # a collapsed embedding would pair everything; stop collecting beyond this
PROJECTED_DIMS = 8  # the k-d tree searches the thumbnails' top principal axes (8: fewest candidates per query second, measured)
PCA_SAMPLE = 20_000  # thumbnails the principal axes are estimated from
CANDIDATE_BUDGET = 4_000_000  # candidate pairs listed at most (estimated first): plain thumbnails pair as N^2
COUNT_SAMPLE = 4_096  # points whose neighbours are counted to estimate the candidates
CHUNK = 8_192  # rows per step of the projection: two float64 temporaries of 12.6 MB (192-byte thumbnails)
PAIR_CHUNK = 8_192  # pairs per step of the full comparison (three float64 (PAIR_CHUNK, D) temporaries)


def _projection(v: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """``(v - mean) @ axes.T`` in float64 (the k-d tree's own precision), a chunk of rows at a
    time: no centred or float copy of ``v`` (uint8 thumbnails stay uint8)."""
    out = np.empty((len(v), len(axes)), np.float64)
    for start in range(0, len(v), CHUNK):
        out[start : start + CHUNK] = (v[start : start + CHUNK] - mean) @ axes.T
    return out


def _search_radius(tree: cKDTree, radius: float) -> float | None:
    """``radius``, or the largest halving of it whose pairs fit CANDIDATE_BUDGET, as estimated
    from the neighbour counts of COUNT_SAMPLE evenly spread points (no pairs built); None when
    not even identical points fit (large groups of one thumbnail)."""
    n = len(tree.data)
    sample = tree.data[evenly_spaced(n, COUNT_SAMPLE)]

    def fits(r: float) -> bool:
        others = tree.query_ball_point(sample, r, return_length=True, workers=-1).sum() - len(sample)
        return others * n / len(sample) / 2 <= CANDIDATE_BUDGET

    radii = [radius * 0.5**halving for halving in range(24)] + [0.0]
    if fits(radii[0]):
        return radius
    if not fits(0.0):
        return None
    wide, narrow = 0, len(radii) - 1  # radii[wide] does not fit, radii[narrow] does
    while narrow - wide > 1:
        middle = (wide + narrow) // 2
        wide, narrow = (wide, middle) if fits(radii[middle]) else (middle, narrow)
    return radii[narrow]


def _identical_pairs(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first MAX_PAIRS pairs (i < j, by i then j) of identical rows of ``v``."""
    n = len(v)
    rows = np.ascontiguousarray(v).view(np.dtype((np.void, v.dtype.itemsize * v.shape[1])))[:, 0]
    group = np.unique(rows, return_inverse=True)[1].ravel()
    members = np.lexsort((np.arange(n), group))  # the indices by group, each group's in order
    position = np.empty(n, np.int64)
    position[members] = np.arange(n)
    partners = np.searchsorted(group[members], group, side="right") - position - 1  # later rows like it
    take = np.minimum(partners, np.maximum(MAX_PAIRS - (np.cumsum(partners) - partners), 0))
    offsets = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
    return np.repeat(np.arange(n), take), members[np.repeat(position + 1, take) + offsets]


def _rms(v: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """RMS difference of the rows ``first`` and ``second`` of ``v`` (float64 differences and
    sums, float32 result), in chunks."""
    out = np.empty(len(first), np.float32)
    for start in range(0, len(first), PAIR_CHUNK):
        a, b = v[first[start : start + PAIR_CHUNK]], v[second[start : start + PAIR_CHUNK]]
        out[start : start + PAIR_CHUNK] = np.sqrt(((a.astype(np.float64) - b) ** 2).mean(axis=1))
    return out


def close_pairs(vectors: np.ndarray, max_rms: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs (i < j) whose RMS difference is at most ``max_rms``, and the differences; exact.

    ``vectors`` of any real dtype, kept as given (uint8 thumbnails: 192 bytes a row, not 768
    as float32), ``max_rms`` in their units. Sub-quadratic: the D-dimensional vectors are
    projected on their top ``PROJECTED_DIMS`` principal axes P (orthonormal rows, so
    ``|P(a - b)| <= |a - b|``: no close pair is lost),
    a k-d tree lists the pairs within ``r = max_rms * sqrt(D)`` in that projection, and each
    candidate is kept when its full RMS difference ``|a - b| / sqrt(D)`` is at most ``max_rms``.
    At most MAX_PAIRS pairs, the closest first.

    The candidates are bounded (CANDIDATE_BUDGET, estimated before any is listed): where many
    vectors are alike (a plain-background data set, whose pairs grow as N^2) the tree lists the
    pairs within a halving of r instead, or, where identical vectors alone are too many, those;
    then the closest MAX_PAIRS are still exact when at least that many lie well within the
    smaller radius, the closest found otherwise.
    """
    from scipy.spatial import cKDTree

    v = np.ascontiguousarray(vectors)
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    if len(v) < 2:
        return empty
    dims = v.shape[1]
    mean = v.mean(axis=0, dtype=np.float64)
    sample = v[evenly_spaced(len(v), PCA_SAMPLE)] - mean
    axes = np.linalg.svd(sample, full_matrices=False)[2][: min(PROJECTED_DIMS, dims)]
    radius = max_rms * np.sqrt(dims) * (1 + 1e-6) + 1e-6  # rounding must not drop a pair at the edge
    tree = cKDTree(_projection(v, mean, axes))
    searched = _search_radius(tree, radius)
    if searched is None:
        first, second = _identical_pairs(v)
    else:
        candidates = tree.query_pairs(searched, output_type="ndarray")
        if len(candidates) == 0:
            return empty
        first, second = candidates[:, 0].astype(np.int64), candidates[:, 1].astype(np.int64)
    rms = _rms(v, first, second)
    keep = rms <= max_rms
    first, second, rms = first[keep], second[keep], rms[keep]
    order = np.lexsort((second, first, rms))[:MAX_PAIRS]
    low, high = np.minimum(first, second)[order], np.maximum(first, second)[order]
    return low, high, rms[order]


def _split_of(cell: object) -> str | None:
    """The ``split`` attribute of an image's attributes cell (train/test...), None without one."""
    return next((str(v) for k, v in attribute_pairs(cell) if k == "split"), None)


def near_duplicates(audited: pd.DataFrame, signals: pd.DataFrame, t: Thresholds,
                    embeddings: Embeddings | None = None) -> list[Finding]:
    """Near-duplicate image pairs; those across the ``split`` attribute are reported as leakage.
    At most two findings (leakage, within split); evidence every pair, most similar first.
    The paired images' embeddings come from ``embeddings`` (by default from ``signals``)."""
    positions = signal_rows(audited, signals)
    present = np.flatnonzero(positions >= 0)
    present = present[np.argsort(positions[present], kind="stable")]  # in the signals' order
    frame = pd.DataFrame({"image_id": audited["image_id"].iloc[present].reset_index(drop=True), "_signal": positions[present],
                          "_audited": present})
    if len(frame) < 2:
        return []
    rows = frame["_signal"].to_numpy()
    thumbnails = stacked(signals["thumbnail"], np.uint8, rows)  # uint8: 192 bytes an image
    i, j, rms = close_pairs(thumbnails, t.duplicate_pixel_rms * 255)
    rms = rms / np.float32(255)
    if len(i) == 0:
        return []
    # from here on only the images in a pair: ``used`` are their rows of ``frame``, i and j index ``used``
    used, pair_rows = np.unique(np.concatenate([i, j]), return_inverse=True)
    i, j = pair_rows[: len(i)], pair_rows[len(i) :]
    ids = frame["image_id"].to_numpy()[used]
    vectors = (embeddings or functools.partial(embedding_rows, signals))(ids)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # not in place: may be Arrow's
    # no embeddings (a model with no layer to read them from: TorchScript): NaN, no veto lifted, no label claim
    sims = (vectors[i] * vectors[j]).sum(axis=1) if vectors.shape[1] else np.full(len(i), np.nan)
    detail = thumbnails[used].std(axis=1, dtype=np.float64) / 255
    same = (sims >= t.duplicate_min_cosine) | (np.minimum(detail[i], detail[j]) >= t.duplicate_min_detail)
    if not same.any():
        return []
    i, j, rms, sims = i[same], j[same], rms[same], sims[same]
    picked = audited.iloc[frame["_audited"].to_numpy()[used]]
    splits = picked["attributes"].map(_split_of).to_numpy()
    labels = picked["labels"].map(lambda ls: ",".join(ls) if ls is not None else "").to_numpy()
    pairs = pd.DataFrame({"a": i, "b": j, "rms": rms, "sim": sims}).sort_values("rms", kind="stable")
    crossing = (splits[pairs["a"]] != splits[pairs["b"]]) & pd.notna(splits[pairs["a"]]) & pd.notna(splits[pairs["b"]])
    found = []
    for leak, group in ((True, pairs[crossing]), (False, pairs[~crossing])):
        if group.empty:
            continue
        images = len(set(group["a"]) | set(group["b"]))
        share = images / len(frame)
        agreeing = group["sim"].to_numpy() >= t.duplicate_min_cosine
        disagree = int(((labels[group["a"]] != labels[group["b"]]) & agreeing).sum())
        unstable = int((~agreeing & ~np.isnan(group["sim"].to_numpy())).sum())
        evidence = list(dict.fromkeys(np.column_stack([ids[group["a"]], ids[group["b"]]]).ravel().tolist()))
        where = (
            "across splits (" + ", ".join(sorted({f"{splits[a]}/{splits[b]}" for a, b in zip(group["a"], group["b"])})) + ")"
            if leak else "within the audited data"
        )
        why = (
            "Images shared between splits leak: test accuracy overstates how the model does on new images. "
            "Remove the duplicates from one split and re-evaluate."
            if leak else
            "Duplicates weigh some images more than others in training and in every accuracy figure; "
            "keep one of each group."
        )
        found.append(
            Finding(
                kind="near_duplicate",
                severity="high" if leak else severity(share, 0.10, 0.02),
                class_name=None,
                slice="leakage" if leak else "within split",
                metric="near_duplicate_pairs",
                value=float(len(group)),
                threshold=1.0,
                message=(
                    f"{len(group)} pairs of images {where} are near-duplicates (their 8x8 thumbnails differ by "
                    f"at most {t.duplicate_pixel_rms} RMS; "
                    + (f"embedding cosine similarity median {np.median(group['sim']):.4f}"
                       if group["sim"].notna().all() else "no model embeddings to compare")
                    + f"), {images} images in all ({share:.1%})"
                    + (f"; {disagree} pairs whose embeddings also agree (cosine at least {t.duplicate_min_cosine}) "
                       "carry different labels: the same image under two labels, so at least one label of each such "
                       "pair is wrong" if disagree else "")
                    + (f"; in {unstable} pairs the model's embeddings disagree (cosine under "
                       f"{t.duplicate_min_cosine}) although the detailed thumbnails match: a model that sees a "
                       "re-encoded copy differently is unstable to re-encoding, or the images differ in details "
                       "finer than the thumbnail: compare them" if unstable else "")
                    + f". {why} Evidence lists the pairs side by side, most similar first."
                ),
                evidence=tuple(evidence),
            )
        )
    return found


DETECTOR = Detector(
    kind="near_duplicate",
    detect=lambda tables, t: near_duplicates(tables.audited, tables.signals, t, tables.embeddings),
    needs=("signals",),
)
