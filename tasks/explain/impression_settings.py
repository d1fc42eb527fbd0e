"""Settings of class impressions (:mod:`visaudit.tasks.explain.impressions`), and which classes get one."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

PARAMETERISATIONS = ("pixel", "fourier")
OBJECTIVES = ("log_odds", "logit")


@dataclass(frozen=True)
class ImpressionSettings:
    """Parameters of the optimisation, with their defaults.

    iterations      200     Adam steps (one batched forward + backward each).
    lr              0.05    Adam step size: in pixel units (pixels live in [0, 1]) for "pixel",
                            per spectrum coefficient for "fourier".
    tv_weight       10.0    lambda_TV. TV_beta is a per-pixel mean, so the weight does not
                            depend on the image size; 10 lowered the neighbour-difference energy
                            by a third on the test model at no cost in class probability. 0 = off.
    tv_beta         2.0     beta of TV_beta; Mahendran & Vedaldi found beta > 1 avoids spikes.
    l2_weight       0.0     lambda_2, a pull towards mid-grey (off by default).
    jitter          8.0     largest translation, in pixels, each way (Lucent's 8 at 224 px;
                            scale it with image_size, e.g. 2 at 32 px).
    rotation        10.0    largest rotation, in degrees, each way (Lucent's range).
    scale           (0.9, 1.1)  range of the random zoom factor, > 1 magnifies (Lucent's range).
    crop_fraction   0.9     smallest side of the random square crop, as a fraction of the image;
                            the crop is resized back to the full image (1.0 = no cropping).
    rgb_jitter      0.05    largest per-channel shift of the pixel values, each way.
    image_size      224     side S of the square impressions, the model's input size.
    init_std        None    standard deviation of the starting noise around mid-grey; None =
                            0.02 for "fourier", 0.1 for "pixel" (the better start of each, measured).
    seed            0       seeds every random draw (starting noise and transformations).
    parameterisation "fourier"  what Adam optimises: "pixel" (the pixels, clamped to [0, 1]) or
                            "fourier" (a 1/f-scaled spectrum through a sigmoid, Olah et al. 2017).
                            Measured on 32 px shapes models like the tests' (100 iterations,
                            tv_weight 10, 3 classes): over 30 seeds, fourier gave 90/90
                            impressions above 0.9 probability (lowest 0.98) against 88/90 for
                            pixel (lowest 0.002: an impression that scored high only once
                            resampled), and 20% less neighbour-difference energy (0.18 vs 0.22;
                            0.27 vs 0.36 without TV); on the tests' model, 12 seeds: both 36/36,
                            energy 0.20 vs 0.27 (those with the logit objective; with the log-odds
                            default: both 36/36, lowest 0.999 and 1.0, energy 0.18 vs 0.28; on the
                            demo model, fourier took all 4 classes above 0.93, pixel left "square"
                            at 0.45). Colour decorrelation (Lucent's ImageNet matrix)
                            converged slower and transferred worse to independently trained
                            models, so it is not offered.
    objective       "log_odds"  what is ascended for the class: "log_odds", log(p / (1 - p)), the
                            class's logit less the log-sum-exp of the others' (the logit itself for
                            multi-label models), or "logit", the raw score (the paper's).
    colour_levels   6       the colour impression (``colour_impressions.colour_impressions``) searches a grid of
                            colour_levels^3 plain colours; 0 = no colour impressions.
    colour_steps    20      Adam steps refining the best grid colour (step size 0.1 on its logit).
    """

    iterations: int = 200
    lr: float = 0.05
    tv_weight: float = 10.0
    tv_beta: float = 2.0
    l2_weight: float = 0.0
    jitter: float = 8.0
    rotation: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    crop_fraction: float = 0.9
    rgb_jitter: float = 0.05
    image_size: int = 224
    init_std: float | None = None
    seed: int = 0
    parameterisation: str = "fourier"
    objective: str = "log_odds"
    colour_levels: int = 6
    colour_steps: int = 20

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {self.iterations!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr (the Adam step size) must be positive, got {self.lr!r}")
        for name in ("tv_weight", "l2_weight", "jitter", "rotation", "rgb_jitter", "init_std"):
            value = getattr(self, name)
            if name == "init_std" and value is None:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.tv_beta, (int, float)) or not self.tv_beta >= 1:
            raise ValueError(f"tv_beta must be at least 1, got {self.tv_beta!r}")
        if self.rotation > 180:
            raise ValueError(f"rotation is in degrees each way and at most 180, got {self.rotation!r}")
        if isinstance(self.scale, list):  # from JSON or TOML: a (low, high) pair
            object.__setattr__(self, "scale", tuple(self.scale))
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be a range (low, high) with 0 < low <= high, got {self.scale!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        if self.rgb_jitter > 1:
            raise ValueError(f"rgb_jitter is a shift of pixel values in [0, 1]; at most 1, got {self.rgb_jitter!r}")
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"image_size must be an integer of at least 8 pixels, got {self.image_size!r}")
        if self.jitter >= self.image_size / 2:
            raise ValueError(f"jitter ({self.jitter} px) must be under half the image size ({self.image_size})")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {self.parameterisation!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name, top in (("colour_levels", 64), ("colour_steps", 100_000)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise ValueError(f"{name} must be an integer from 0 to {top}, got {value!r}")

    @property
    def start_std(self) -> float:
        """The starting noise's standard deviation: ``init_std``, or the parameterisation's default."""
        if self.init_std is not None:
            return float(self.init_std)
        return 0.02 if self.parameterisation == "fourier" else 0.1

    @property
    def has_geometry(self) -> bool:
        """Whether any geometric transformation is on (otherwise the resampling is skipped)."""
        return bool(self.jitter or self.rotation or self.scale != (1.0, 1.0) or self.crop_fraction < 1)

    def as_dict(self) -> dict[str, Any]:
        """The parameters as plain JSON-able values (for ``run.json`` and the table)."""
        values = asdict(self)
        values["scale"] = list(self.scale)
        return values


def settings_for_input(image_size: int, **overrides: Any) -> ImpressionSettings:
    """Default settings for a model whose input is ``image_size`` pixels a side: the jitter
    (Lucent's 8 px at 224) scales with the size; ``overrides`` set any other parameter."""
    jitter = min(8.0 * image_size / 224, image_size / 2 - 1)
    return ImpressionSettings(**({"image_size": image_size, "jitter": round(jitter, 2)} | overrides))


def choose_classes(class_names: Sequence[str], requested: Sequence[str], cap: int,
                   counts: Mapping[str, int] | None = None) -> list[int]:
    """The class indices to synthesise: the ``requested`` names, in order; or, when none are
    named, every class up to ``cap``, the classes with most images in ``counts`` first
    (ties and absent classes in output order)."""
    if cap < 1:
        raise ValueError(f"the cap on impression classes must be at least 1, got {cap}")
    position = {name: i for i, name in enumerate(class_names)}
    if requested:
        unknown = [name for name in requested if name not in position]
        if unknown:
            raise ValueError(f"impression class(es) {unknown} are not among the model's classes "
                             f"({', '.join(list(class_names)[:8])}{', ...' if len(class_names) > 8 else ''})")
        return list(dict.fromkeys(position[name] for name in requested))
    counts = counts or {}
    order = sorted(range(len(class_names)), key=lambda i: (-counts.get(class_names[i], 0), i))
    return order[:cap]
