"""The settings groups of the explanation methods with parameters of their own: occlusion
(and the RISE scores), MIL patches, adversarial noise, the sanity check and class impressions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field, ValidationInfo, field_validator

from visaudit.tasks.audit.settings import Settings, option, split_list
from visaudit.tasks.explain.impression_settings import ImpressionSettings, settings_for_input

if TYPE_CHECKING:  # the command line's --help reads these groups: torch loads on use
    from visaudit.tasks.explain.adversarial import AttackSettings
    from visaudit.tasks.explain.mil import MilSpec
    from visaudit.tasks.explain.occlusion import OcclusionSpec


class OcclusionSettings(Settings):
    """Occlusion muting and the RISE deletion/insertion scores that go with it."""

    title: ClassVar[str] = "Occlusion"
    grid: int = option(7, "Occlusion: windows per side (window = stride = size / grid).", key="occlusion_grid",
                       flag="occlusion-grid", ge=1, le=64)
    window: int | None = option(None, "Occlusion: window in pixels (instead of a grid).", key="occlusion_window",
                                flag="occlusion-window", ge=1)
    stride: int | None = option(None, "Occlusion: stride in pixels (default: the window).", key="occlusion_stride",
                                flag="occlusion-stride", ge=1)
    baseline: str = option("zero", "Occlusion: what a muted window holds: zero, mean, blur.",
                           key="occlusion_baseline", flag="occlusion-baseline", pattern="^(zero|mean|blur)$")
    rise_images: int = option(16, "With occlusion or mil_patches: images for RISE deletion/insertion of Grad-CAM, "
                              "occlusion and mil_patches (0 = off).", ge=0, le=1024)

    def spec(self) -> OcclusionSpec:
        """The occlusion geometry: a window in pixels when given, else the grid."""
        from visaudit.tasks.explain.occlusion import OcclusionSpec

        if self.window is not None:
            return OcclusionSpec(window=self.window, stride=self.stride, baseline=self.baseline)
        if self.stride is not None:
            raise ValueError("--occlusion-stride needs --occlusion-window")
        return OcclusionSpec(grid=self.grid, baseline=self.baseline)


class MilSettings(Settings):
    """Multiple-instance patch maps (``mil_patches``): patch side and stride as fractions of the input side."""

    title: ClassVar[str] = "MIL patches"
    patch: float = option(0.25, "mil_patches: patch side as a fraction of the input side (0.25: 56 px at 224).",
                          key="mil_patch", flag="mil-patch", gt=0, le=1)
    stride: float = option(0.125, "mil_patches: stride as a fraction of the input side (at most the patch).",
                           key="mil_stride", flag="mil-stride", gt=0, le=1)

    @field_validator("stride")
    @classmethod
    def _stride_within_patch(cls, stride: float, info: ValidationInfo) -> float:
        if stride > info.data.get("patch", stride):
            raise ValueError(f"the stride {stride} is larger than the patch {info.data['patch']}: pixels between "
                             "patches would never be classified")
        return stride

    def spec(self) -> MilSpec:
        """The patch geometry, resolved at the input size by :meth:`MilSpec.geometry`."""
        from visaudit.tasks.explain.mil import MilSpec

        return MilSpec(self.patch, self.stride)


class AdversarialSettings(Settings):
    """Explanations under adversarial noise (Grad-CAM paper, sec. 6.2): L-inf PGD on a sample (``explain.adversarial``)."""

    title: ClassVar[str] = "Adversarial noise"
    images: int = option(0, "Adversarial: correctly predicted (or unlabelled) images attacked, taken in turn from each class (0 = off; "
                         "~3 s an image for a ResNet-18 at 224 px on 2 CPUs).", key="adversarial_images", ge=0)
    epsilons: list[Annotated[float, Field(gt=0, le=255)]] = option([1.0, 2.0, 4.0, 8.0], "Adversarial: L-inf budgets "
        "in 1/255 of the [0, 1] pixel range, before normalisation (comma-separated).", key="adversarial_epsilons",
        form="comma", min_length=1)
    steps: int = option(10, "Adversarial: PGD steps.", key="adversarial_steps", ge=1, le=1000)
    step_ratio: float = option(2.5, "Adversarial: PGD step size = this x budget / steps (Madry et al. 2018).",
                               key="adversarial_step_ratio", gt=0, le=100)
    seed: int = option(0, "Adversarial: seed of PGD's random start.", key="adversarial_seed")

    _split_epsilons = field_validator("epsilons", mode="before")(lambda cls, value: split_list(value))

    def attack(self) -> AttackSettings:
        """PGD's settings, budgets in [0, 1] pixel units (a budget outside (0, 255] / 255 is a ValueError)."""
        from visaudit.tasks.explain.adversarial import AttackSettings

        return AttackSettings(tuple(sorted({e / 255 for e in self.epsilons})), self.steps, self.step_ratio, True, self.seed)


class SanitySettings(Settings):
    """The model-randomisation sanity check of the methods (Adebayo et al. 2018)."""

    title: ClassVar[str] = "Sanity check"
    enabled: bool = option(True, "Model-randomisation check of the methods.", key="sanity_check",
                           form="switch:--sanity-check/--no-sanity-check")
    images: int = option(16, "Images used by the sanity check.", key="sanity_images", flag="sanity-images",
                         ge=2, le=256)


class ImpressionRequest(Settings):
    """Class impressions: which classes, and the optimisation's main parameters."""

    title: ClassVar[str] = "Class impressions"
    classes: list[str] = option([], "Impressions: synthesise this class (repeatable; default: every class up to the "
                                "cap).", key="impression_classes", flag="impression-class", form="repeat")
    max_classes: int = option(16, "Impressions: most classes, the most frequent first.",
                              key="impression_max_classes", flag="impression-max-classes", ge=1, le=1000)
    iterations: int = option(200, "Impressions: gradient-ascent steps.", key="impression_iterations",
                             flag="impression-iterations", ge=1, le=100_000)
    tv_weight: float = option(10.0, "Impressions: Total Variation weight (0 = off).", key="impression_tv_weight",
                              flag="impression-tv-weight", ge=0, le=1e6)
    seed: int = option(0, "Impressions: random seed (same seed, same images).", key="impression_seed",
                       flag="impression-seed")
    options: dict[str, Any] = option({}, "Impressions: any other parameter, NAME=VALUE (repeatable; see README).",
                                     key="impression_options", flag="impression-option", form="pairs")

    def settings(self, image_size: int) -> ImpressionSettings:
        """The impressions' settings at the model's input size; a bad option is a ValueError."""
        dedicated = {"iterations": "--impression-iterations", "tv_weight": "--impression-tv-weight",
                     "seed": "--impression-seed", "image_size": "--crop (the model's input size)"}
        if clash := [name for name in self.options if name in dedicated]:
            raise ValueError(f"impression option(s) {clash} have their own setting: "
                             f"{', '.join(dedicated[name] for name in clash)}")
        known = set(ImpressionSettings.__dataclass_fields__) - set(dedicated)
        if unknown := sorted(set(self.options) - known):
            raise ValueError(f"unknown impression option(s) {unknown}; available: {', '.join(sorted(known))}")
        return settings_for_input(image_size, iterations=self.iterations, tv_weight=self.tv_weight, seed=self.seed,
                                  **self.options)
