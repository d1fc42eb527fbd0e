"""The paired statistics of `visaudit compare` and the series events, against independent
implementations: scipy's binomial test and Spearman correlation, and the unpaired Newcombe
interval (``findings.stats``), which the paired one must equal when the runs' verdicts are
uncorrelated (phi = 0)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from visaudit.tasks.audit.map_shift import rowwise_spearman
from visaudit.tasks.findings.paired import EXACT_BELOW, mcnemar, paired_change
from visaudit.tasks.findings.stats import difference_interval


def verdicts(both: int, broken: int, fixed: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([True] * both + [True] * broken + [False] * fixed + [False] * neither)
    b = np.array([True] * both + [False] * broken + [True] * fixed + [False] * neither)
    return a, b


def test_paired_counts_and_exact_mcnemar() -> None:
    change = paired_change(*verdicts(both=10, broken=7, fixed=2, neither=5))
    assert (change.images, change.broken, change.fixed) == (24, 7, 2)
    assert change.accuracy_a == pytest.approx(17 / 24) and change.accuracy_b == pytest.approx(12 / 24)
    assert change.test == "exact binomial"
    assert change.p_value == pytest.approx(stats.binomtest(2, 9, 0.5).pvalue, rel=1e-12)
    assert change.low < change.change < change.high


def test_large_discordant_counts_use_the_corrected_chi_square_close_to_exact() -> None:
    fixed, broken = 14, 31
    assert fixed + broken >= EXACT_BELOW
    p, test = mcnemar(fixed, broken)
    assert test.startswith("chi-square")
    assert p == pytest.approx(stats.binomtest(fixed, fixed + broken, 0.5).pvalue, rel=0.15)
    assert mcnemar(0, 0) == (1.0, "exact binomial")


def test_uncorrelated_table_gives_the_unpaired_newcombe_interval() -> None:
    both, broken, fixed, neither = 4, 2, 6, 3  # both * neither == broken * fixed: phi = 0
    change = paired_change(*verdicts(both, broken, fixed, neither))
    n = np.float64(both + broken + fixed + neither)
    low, high = difference_interval(np.float64(both + broken), n, np.float64(both + fixed), n, 1.959963984540054)
    assert (change.low, change.high) == pytest.approx((float(low), float(high)), abs=1e-12)


def test_positive_correlation_narrows_the_interval() -> None:
    paired = paired_change(*verdicts(both=40, broken=2, fixed=10, neither=48))
    n = np.float64(100)
    low, high = difference_interval(np.float64(42), n, np.float64(50), n, 1.959963984540054)
    assert high - low > paired.high - paired.low > 0
    assert paired.significant and paired.low > 0, "8 more right of 100, 10 vs 2 discordant"


def test_rowwise_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    a = np.round(rng.random((6, 49)), 1)  # rounded: ties
    b = np.round(a + rng.normal(0, 0.3, a.shape), 1)
    b[2] = a[2] * 3 + 1  # a monotone transform: rho = 1
    expected = [stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(rowwise_spearman(a, b), expected, atol=1e-12)
    assert rowwise_spearman(a, b)[2] == pytest.approx(1.0)
    assert np.isnan(rowwise_spearman(np.ones((1, 4)), a[:1, :4]))[0]


def test_paired_change_refuses_unequal_arrays() -> None:
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_change(np.ones(3, bool), np.ones(4, bool))
