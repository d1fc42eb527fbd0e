"""Calibration: does a 90%-confident prediction come true 90% of the time?

Reliability diagram and expected calibration error (Guo et al. 2017, "On Calibration of
Modern Neural Networks"): predictions are binned by top-1 confidence into ``bins`` equal
intervals of [0, 1]; per bin, accuracy and mean confidence; and

    ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|

(0 for a calibrated model; the paper reports 4-10% for modern ImageNet CNNs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

DEFAULT_BINS = 15  # the paper's choice


@dataclass(frozen=True)
class Reliability:
    """Per-bin counts, accuracy and mean confidence (NaN in empty bins), and the ECE."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,)
    accuracy: np.ndarray
    confidence: np.ndarray
    ece: float


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = DEFAULT_BINS) -> Reliability:
    """Bin top-1 ``confidence`` (N,) with ``correct`` (N,) bool into ``bins`` equal intervals
    (right-closed, the first also holding 0) and compute the ECE."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError("confidence and correct must be 1-D arrays of the same length")
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
    total = counts.sum()
    gaps = np.where(counts > 0, np.abs(accuracy - mean_confidence), 0.0)
    ece = float((counts * gaps).sum() / total) if total else float("nan")
    return Reliability(edges, counts, accuracy, mean_confidence, ece)


def reliability_of(judged: pd.DataFrame) -> Reliability:
    """:func:`reliability` of a ``predictions`` frame's judged rows (top-1 confidence, correct)."""
    return reliability(judged["confidence"].to_numpy(float), judged["correct"].astype(bool).to_numpy())
