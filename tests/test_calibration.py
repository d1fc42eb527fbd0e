"""Reliability and ECE against a plain per-bin loop (Guo et al. 2017's definition)."""

from __future__ import annotations

import numpy as np
import pytest

from visaudit.tasks.findings.calibration import reliability


def _loop_ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (confidence > low) & (confidence <= high) if b else (confidence >= 0) & (confidence <= high)
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return total / len(confidence)


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_ece_matches_the_definition(bins: int) -> None:
    rng = np.random.default_rng(bins)
    confidence = rng.uniform(0.2, 1.0, 500)
    correct = rng.random(500) < confidence ** 2  # over-confident
    result = reliability(confidence, correct, bins)
    assert result.ece == pytest.approx(_loop_ece(confidence, correct, bins), abs=1e-12)
    assert result.counts.sum() == 500 and len(result.edges) == bins + 1


def test_calibrated_and_confidently_wrong_extremes() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0, 1, 200_000)
    calibrated = reliability(confidence, rng.random(200_000) < confidence)
    assert calibrated.ece < 0.01
    wrong = reliability(np.full(50, 0.95), np.zeros(50, bool))
    assert wrong.ece == pytest.approx(0.95) and np.isnan(wrong.accuracy[0])  # empty bins stay NaN
    with pytest.raises(ValueError, match="same length"):
        reliability(np.ones(3), np.ones(2, bool))
