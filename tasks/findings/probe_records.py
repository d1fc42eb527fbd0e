"""What the model probes of the findings step measured (``fixed_location``, ``cue_probe``
compute them, with the model): the records the detectors judge and the report reads, no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LocationCandidate:
    """A class whose map peaks cluster at one spot (x, y as fractions of the input)."""

    class_name: str
    x: float
    y: float
    share: float
    images: int
    sample_ids: tuple[str, ...]  # images of the class whose peak is in the spot, for the probes


@dataclass(frozen=True)
class LocationProbe:
    """What the content and occlusion probes measured for one candidate."""

    x: float  # centre of the most constant patch near the peaks (fractions of the input)
    y: float
    side: float  # its side, a fraction of the input side
    patch_ratio: float  # its spread across images / the median spread of patches of its size
    drop: float  # mean drop of the class's probability when the spot is muted
    control_drop: float  # the same, muting the reference spots
    flip_share: float  # of the probed images predicted as the class, the share no longer predicted
    images: int


@dataclass(frozen=True)
class CueProbe:
    """What the probes measured for one class (tests 1 to 3)."""

    class_name: str
    images: int  # images of the class searched
    carriers: tuple[str, ...]  # image ids carrying the cue, the seed first
    share: float  # carriers / images
    ratio: float  # median match ratio of the carriers
    side: float  # the cue's side, a fraction of the input side
    places: tuple[tuple[float, float], ...]  # distinct carrier places (crop centres, fractions, 0.05 grid)
    others: int  # images of other classes pasted onto (not predicted as the class before)
    flip_share: float  # of those, the share predicted as the class with the cue pasted
    control_flip_share: float  # ... with the class's other images' attended crops pasted
    drop: float  # mean drop of the class's probability on the carriers with the cue removed
    control_drop: float  # ... on the class's other images with their attended crops filled
    removal_flip_share: float  # of the carriers predicted as the class, the share no longer predicted
