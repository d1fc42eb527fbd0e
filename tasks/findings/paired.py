"""Paired proportions: the same images judged by two runs (two models, or two nights).

With ``n`` images judged by both runs, ``both`` right in both, ``broken`` right in A only,
``fixed`` right in B only and ``neither``, the accuracies are ``p_a = (both + broken) / n``
and ``p_b = (both + fixed) / n``; their difference ``p_b - p_a = (fixed - broken) / n``
depends on the discordant images alone.

- McNemar's test of ``p_a = p_b``: exact, the two-sided binomial test of ``fixed`` among
  ``fixed + broken`` discordant images at 1/2, when they number fewer than
  :data:`EXACT_BELOW` (the chi-square approximation is poor there); else the
  continuity-corrected statistic ``(|fixed - broken| - 1)^2 / (fixed + broken)`` against
  chi-square with one degree of freedom.
- The interval of ``p_b - p_a``: Newcombe's hybrid score interval for paired data
  (Newcombe 1998, "Improved confidence intervals for the difference between binomial
  proportions based on paired data", method 10): Wilson intervals ``[l, u]`` of each
  accuracy, combined with the correlation ``phi`` of the 2x2 table,
  ``phi = (both * neither - broken * fixed) / sqrt((both+broken)(fixed+neither)(both+fixed)(broken+neither))``
  (0 when a margin is empty):
  ``low = d - sqrt((p_b - l_b)^2 - 2 phi (p_b - l_b)(u_a - p_a) + (u_a - p_a)^2)``,
  ``high = d + sqrt((u_b - p_b)^2 - 2 phi (u_b - p_b)(p_a - l_a) + (p_a - l_a)^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from visaudit.tasks.findings.stats import wilson_interval

EXACT_BELOW = 25  # fewer discordant images than this: the exact binomial test
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class PairedChange:
    """How a proportion changed from run A to run B on the same images."""

    images: int
    accuracy_a: float
    accuracy_b: float
    fixed: int  # wrong in A, right in B
    broken: int  # right in A, wrong in B
    low: float  # interval of accuracy_b - accuracy_a
    high: float
    p_value: float
    test: str  # "exact binomial" or "chi-square (continuity-corrected)"

    @property
    def change(self) -> float:
        return self.accuracy_b - self.accuracy_a

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0


def mcnemar(fixed: int, broken: int) -> tuple[float, str]:
    """McNemar's two-sided p-value for the discordant counts, and which test gave it."""
    discordant = fixed + broken
    if discordant == 0:
        return 1.0, "exact binomial"
    if discordant < EXACT_BELOW:
        return float(stats.binomtest(fixed, discordant, 0.5).pvalue), "exact binomial"
    statistic = (abs(fixed - broken) - 1) ** 2 / discordant
    return float(stats.chi2.sf(statistic, 1)), "chi-square (continuity-corrected)"


def paired_change(right_a: np.ndarray, right_b: np.ndarray, z: float = Z_95) -> PairedChange:
    """The change of accuracy from A to B on images judged by both (``right_a[i]``,
    ``right_b[i]``: image i right in each run)."""
    right_a, right_b = np.asarray(right_a, dtype=bool), np.asarray(right_b, dtype=bool)
    if right_a.shape != right_b.shape or right_a.ndim != 1 or not len(right_a):
        raise ValueError(f"paired_change needs two equal, non-empty 1-D arrays (got {right_a.shape}, {right_b.shape})")
    n = len(right_a)
    both = int((right_a & right_b).sum())
    broken = int((right_a & ~right_b).sum())
    fixed = int((~right_a & right_b).sum())
    neither = n - both - broken - fixed
    p_a, p_b = (both + broken) / n, (both + fixed) / n
    (l_a, u_a), (l_b, u_b) = (wilson_interval(np.float64(k), np.float64(n), z) for k in (both + broken, both + fixed))
    margins = (both + broken) * (fixed + neither) * (both + fixed) * (broken + neither)
    phi = (both * neither - broken * fixed) / np.sqrt(margins) if margins else 0.0
    d = p_b - p_a
    low = d - np.sqrt(max((p_b - l_b) ** 2 - 2 * phi * (p_b - l_b) * (u_a - p_a) + (u_a - p_a) ** 2, 0.0))
    high = d + np.sqrt(max((u_b - p_b) ** 2 - 2 * phi * (u_b - p_b) * (p_a - l_a) + (p_a - l_a) ** 2, 0.0))
    p_value, test = mcnemar(fixed, broken)
    return PairedChange(images=n, accuracy_a=p_a, accuracy_b=p_b, fixed=fixed, broken=broken, low=float(low),
                        high=float(high), p_value=p_value, test=test)
