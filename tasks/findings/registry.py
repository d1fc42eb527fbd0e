"""Every finding detector, in the order findings of one severity are listed.

Within a severity: what the model learnt wrong first, then its errors, then the data's
issues. A detector's rank is its position here, and whether it is map-based is its own
registration's ``map_based``: neither is kept anywhere else. Adding a detector is one
module under ``tasks/findings/`` defining its ``DETECTOR`` and one line below.
"""

from __future__ import annotations

from visaudit.tasks.findings import (
    adversarial_fragility,
    attention_fixed_location,
    attention_off_object,
    class_imbalance,
    colour_shortcut,
    confident_error,
    confused_pair,
    error_slice,
    group_gap,
    likely_label_error,
    near_duplicate,
    shortcut_cue,
    shortcut_property,
    slice_gap,
    unfaithful_explanation,
)
from visaudit.tasks.findings.finding import Detector

DETECTORS: tuple[Detector, ...] = (
    attention_fixed_location.DETECTOR,
    shortcut_cue.DETECTOR,
    shortcut_property.DETECTOR,
    colour_shortcut.DETECTOR,
    attention_off_object.DETECTOR,
    slice_gap.DETECTOR,
    group_gap.DETECTOR,
    error_slice.DETECTOR,
    unfaithful_explanation.DETECTOR,
    confident_error.DETECTOR,
    adversarial_fragility.DETECTOR,
    confused_pair.DETECTOR,
    likely_label_error.DETECTOR,
    near_duplicate.DETECTOR,
    class_imbalance.DETECTOR,
)
if len({d.kind for d in DETECTORS}) != len(DETECTORS):
    raise RuntimeError("two registered detectors share a kind")

KIND_RANK: dict[str, int] = {d.kind: rank for rank, d in enumerate(DETECTORS)}
MAP_BASED: frozenset[str] = frozenset(d.kind for d in DETECTORS if d.map_based)
