"""Interval statistics for proportions, used by the ``slice_gap`` detector and the report.

Wilson's score interval of a proportion, and Newcombe's hybrid score interval for the
difference of two proportions (Newcombe 1998, "Interval estimation for the difference
between independent proportions", method 10), vectorised over numpy arrays.
"""

from __future__ import annotations

import numpy as np

Z_95 = 1.959964  # normal quantile of a two-sided 95% interval


def wilson_interval(successes: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of the proportion ``successes / n`` at normal quantile ``z``."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def difference_interval(
    k1: np.ndarray, n1: np.ndarray, k2: np.ndarray, n2: np.ndarray, z: float
) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval for p2 - p1, with p1 = k1 / n1 and p2 = k2 / n2."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p2 - p1
    return d - np.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + np.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
