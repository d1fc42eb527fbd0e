"""The setup checks' records (:mod:`visaudit.tasks.audit.setup_checks` computes them): their
thresholds, each scored preprocessing, the class order, the near-chance test, and the
report that ``run.json`` keeps and the report's appendix shows. No torch: the report reads
them without loading the model's stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from visaudit.tasks.findings.stats import wilson_interval


@dataclass(frozen=True)
class SetupThresholds:
    """When a setup check stops the run (see the module's docstring)."""

    probe_images: int = 200
    min_gain: float = 0.20  # accuracy points the interval's lower end must clear
    max_loss_ratio: float = 0.5  # an alternative's mean loss at most this times the given one's
    confidence: float = 0.95  # of the intervals (Bonferroni-corrected over the alternatives)
    native_max: int = 160  # the images' native size is tried when their shorter side is at most this
    screen_images: int = 48  # every alternative is scored on this many probe images first
    screen_loss_ratio: float = 0.8  # the screen's best is scored on the whole probe when its loss is at most this


@dataclass(frozen=True)
class Scored:
    """One preprocessing scored on the probe: right as given, and (what the search compares, so
    that a wrong class order does not pass for a wrong preprocessing) right and mean loss with
    the outputs assigned to the class names that fit them best."""

    resize: int
    crop: int
    normalisation: str  # a NORMALISATIONS name, or "given"
    channels: str
    correct: int
    assigned: int
    images: int
    loss: float  # with the assignment
    order: list[int]  # the output assigned to each class name

    @property
    def accuracy(self) -> float:
        return self.assigned / self.images


@dataclass(frozen=True)
class NearChance:
    """The accuracy's Wilson interval against chance (the most common label's share)."""

    metric: str  # "accuracy" or "exact_match"
    value: float
    low: float
    high: float
    chance: float
    images: int
    near: bool  # the interval's lower end is at or below chance


@dataclass(frozen=True)
class ClassOrder:
    """The probe's best assignment of outputs to class names against the given order."""

    correct_given: int
    correct_assigned: int
    images: int
    gain_low: float  # lower end of the accuracy gain's interval
    suggested: list[str]  # class names in the order the assignment gives the outputs
    wrong: bool


@dataclass(frozen=True)
class SetupReport:
    """Every setup check's numbers, as run.json and the report's appendix show them."""

    probe_images: int
    metric: str
    given: Scored
    best: Scored
    alternatives: int  # preprocessings tried besides the given one
    screen_images: int  # probe images every alternative was scored on
    screen_best: Scored | None  # the best alternative on those images (None: none besides the given)
    gain_low: float  # lower end of the best alternative's accuracy gain interval
    loss_ratio: float  # best alternative's mean loss / the given one's
    preprocessing_fix: str | None  # the flags, when the best alternative is clearly better
    class_order: ClassOrder
    near_chance: NearChance
    seconds: float
    thresholds: SetupThresholds


def near_chance(correct: np.ndarray, label_keys: list[str], confidence: float, metric: str) -> NearChance:
    """Is ``correct.mean()`` within reach of chance? ``label_keys``: each image's label (its
    sorted label set for multi-label); chance = the most common key's share."""
    n = len(correct)
    if n == 0:
        return NearChance(metric, float("nan"), float("nan"), float("nan"), float("nan"), 0, False)
    chance = float(pd.Series(label_keys).value_counts().iloc[0] / n)
    k = float(np.sum(correct))
    low, high = wilson_interval(np.array(k), np.array(float(n)), NormalDist().inv_cdf(0.5 + confidence / 2))
    return NearChance(metric, k / n, float(low), float(high), chance, n, bool(low <= chance))
