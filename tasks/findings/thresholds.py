"""Thresholds of the finding detectors (documented in the README's "Finding kinds") and severity bands.

Every number a detector compares against to decide whether to flag lives in
:class:`Thresholds`; the cut points that grade a flag's severity stay with each detector
(they are the README table's "severity" column). Method parameters that decide how a
signal is measured, not when it is flagged (cross-validation folds, the fixed-location
spot radius and patch sizes), stay in the detector's module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2}
_UNIT = ("_share", "_confidence", "_probability")  # thresholds that are fractions of 1


@dataclass(frozen=True)
class Thresholds:
    """Documented, configurable thresholds; ``--threshold name=value`` overrides one."""

    confident_error_confidence: float = 0.9  # a wrong prediction at least this confident is a confident error
    confident_error_share: float = 0.02  # flag a class when this share of its images are confident errors
    confused_pair_share: float = 0.10  # flag true->predicted pairs taking this share of the true class
    confused_pair_min_count: int = 3  # ... and at least this many images
    imbalance_ratio: float = 0.5  # flag a class whose share is below this fraction of the uniform share 1/K
    off_object_share: float = 0.5  # flag a class when, surely (Wilson upper end), fewer than this share of its
    # maps put more energy in the object box than a uniform map (normalised excess > 0)
    min_class_images: int = 5  # classes with fewer audited images are not judged by per-class rates
    evidence: int = 8  # evidence image ids kept per finding (label errors and duplicates keep all)
    sanity_max_spearman: float = 0.5  # a method whose maps keep this rank correlation after the
    # classifier and the explained stage are randomised fails the sanity check (Adebayo et al. 2018)
    shortcut_balanced_accuracy: float = 0.75  # one image property tells a class from the rest this well
    # (cross-validated one-feature classifier; chance = 0.5, the majority-class guess)
    slice_margin: float = 0.05  # a slice's accuracy gap must exceed this with the interval below
    slice_confidence: float = 0.95  # family-wise level of the gap intervals (Bonferroni over slices)
    min_slice_images: int = 20  # smaller slices are not judged
    max_slice_values: int = 50  # attributes with more distinct values (ids, free text) are not sliced
    min_group_images: int = 10  # (class, attribute value) groups with fewer images are not judged
    label_error_share: float = 0.02  # flag a class when confident learning flags this share of its labels
    label_error_min_count: int = 2  # ... and at least this many of them
    label_error_probability: float = 0.05  # a given label the model gives at most this probability is surprising;
    # label noise is supported when surprising labels outnumber what the model's own probabilities predict
    label_error_confidence: float = 0.95  # ... at this level (one-sided Poisson test over the run)
    duplicate_pixel_rms: float = 0.02  # RMS difference of 8x8 thumbnails (pixels in [0, 1]) of near-duplicates
    duplicate_min_cosine: float = 0.9  # ... whose embeddings also agree at least this much (a JPEG re-encode: ~0.997),
    duplicate_min_detail: float = 0.05  # ... unless both thumbnails vary this much (pixel std): then the match alone decides
    faithfulness_min_spearman: float = 0.2  # a class whose median Grad-CAM/occlusion rank correlation is lower
    fixed_location_share: float = 0.5  # share of a class's map peaks in one spot
    fixed_location_patch_ratio: float = 0.5  # attended patches' spread vs. patches elsewhere (lower = same content)
    fixed_location_drop: float = 0.2  # mean drop of the class's probability when that spot is muted
    fixed_location_control: float = 2.0  # ... at least this many times the drop from muting elsewhere
    cue_match_ratio: float = 0.5  # two images carry the same thing when a crop's best match in the other is
    # within this share of the crop's own contrast (RMS, channel means removed; shortcut_cue)
    cue_min_share: float = 0.2  # ... and the carriers are at least this share of the class's searched images
    cue_flip_share: float = 0.25  # pasting the cue turns at least this share of other classes' images to the class
    cue_control: float = 2.0  # ... and at least this many times the share that pasting the control patches turns
    colour_shortcut_probability: float = 0.9  # a plain image of one colour alone gets its class this probability
    colour_nearer_borders: float = 0.75  # ... and it is a background shortcut when the class's images' median
    # border distance to that colour (RGB, 0..255) is at most this share of the other images'
    adversarial_epsilon: float = 2.0  # PGD budgets up to this, in 1/255 of the pixel range, are tiny (adversarial_fragility)
    adversarial_share: float = 0.5  # flag a class when surely (Wilson lower end) this share of its attacked images
    # flip at a tiny budget

    def __post_init__(self) -> None:
        """Refuse a threshold that is not a finite number in its range (NaN would silently
        pass or fail every comparison): rank correlations in [-1, 1], shares, confidences and
        probabilities in [0, 1], everything else at least 0."""
        for name, value in asdict(self).items():
            low, high = (-1.0, 1.0) if name.endswith("spearman") else (0.0, 1.0 if name.endswith(_UNIT) else math.inf)
            if isinstance(value, bool) or not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"threshold {name}={value!r}: must be a finite number in [{low:g}, {high:g}]")

    def as_dict(self) -> dict[str, float]:
        """Every threshold by name (run.json records them)."""
        return asdict(self)


def severity(value: float, high: float, medium: float, larger_is_worse: bool = True) -> str:
    """'high', 'medium' or 'low' by two cut points (inclusive)."""
    if larger_is_worse:
        return "high" if value >= high else "medium" if value >= medium else "low"
    return "high" if value <= high else "medium" if value <= medium else "low"
