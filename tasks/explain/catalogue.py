"""The explanation methods' names, display titles and kinds: what the report and the command
line read, without torch. :mod:`visaudit.tasks.explain.registry` joins each to what computing
it takes (a CAM weight function, a check of the model).

Kinds:

- ``gradient``     a CAM-family method computed from the gradients at the explained layer;
- ``guided``       an input-space method from the guided backward (maps keyed at :data:`INPUT_LAYER`);
- ``cam``          CAM from the model's global-average-pool + linear head (no gradients);
- ``attention``    a transformer's attention rolled out over its blocks (maps keyed at :data:`ATTENTION_LAYER`);
- ``occlusion``    muting windows;
- ``patches``      every patch classified on its own, multiple-instance style (maps keyed at :data:`INPUT_LAYER`);
- ``impressions``  class impressions synthesised from noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

Kind = Literal["gradient", "guided", "cam", "attention", "occlusion", "patches", "impressions"]

INPUT_LAYER = "input"  # the layer input-space (guided) maps are keyed at
ATTENTION_LAYER = "attention"  # the layer attention-rollout maps (every block's attention) are keyed at


@dataclass(frozen=True)
class MethodInfo:
    """One explanation method as stored and shown: its name, display title and kind."""

    name: str
    title: str
    kind: Kind

    @property
    def needs_layer(self) -> bool:
        """Whether the method hooks the model's modules (every kind but occlusion, patches and
        impressions, which only run the model and take gradients with respect to its input)."""
        return self.kind not in ("occlusion", "patches", "impressions")

    @property
    def needs_gradients(self) -> bool:
        """Whether the method backpropagates to the explained layer (the gradient and guided kinds)."""
        return self.kind in ("gradient", "guided")

    def stored_layer(self, layer: str) -> str:
        """The layer the method's maps are keyed at: :data:`INPUT_LAYER` for guided and patch
        maps, :data:`ATTENTION_LAYER` for attention maps, else ``layer``."""
        return {"guided": INPUT_LAYER, "patches": INPUT_LAYER, "attention": ATTENTION_LAYER}.get(self.kind, layer)


CATALOGUE: tuple[MethodInfo, ...] = (
    MethodInfo("gradcam", "Grad-CAM", "gradient"),
    MethodInfo("gradcam++", "Grad-CAM++", "gradient"),
    MethodInfo("xgradcam", "XGrad-CAM", "gradient"),
    MethodInfo("layercam", "LayerCAM", "gradient"),
    MethodInfo("hirescam", "HiResCAM", "gradient"),
    MethodInfo("counterfactual", "Counterfactual", "gradient"),
    MethodInfo("cam", "CAM", "cam"),
    MethodInfo("guided_backprop", "Guided Backprop", "guided"),
    MethodInfo("guided_gradcam", "Guided Grad-CAM", "guided"),
    MethodInfo("attention_rollout", "Attention rollout", "attention"),
    MethodInfo("gradient_rollout", "Gradient-weighted rollout", "attention"),
    MethodInfo("occlusion", "Occlusion", "occlusion"),
    MethodInfo("mil_patches", "MIL patches", "patches"),
    MethodInfo("impressions", "Class impressions", "impressions"),
)
_BY_NAME: dict[str, MethodInfo] = {info.name: info for info in CATALOGUE}
GUIDED_METHODS: tuple[str, ...] = tuple(m.name for m in CATALOGUE if m.kind == "guided")
ATTENTION_METHODS: tuple[str, ...] = tuple(m.name for m in CATALOGUE if m.kind == "attention")
PATCH_METHODS: tuple[str, ...] = tuple(m.name for m in CATALOGUE if m.kind == "patches")


def method_names() -> tuple[str, ...]:
    """Every method's name, in the catalogue's order."""
    return tuple(_BY_NAME)


def method_title(name: str) -> str:
    """The method's display title ("Grad-CAM"); a name the catalogue does not know (a method
    stored by another version) is its own title."""
    info = _BY_NAME.get(name)
    return info.title if info is not None else name


def method_kind(name: str) -> Kind | None:
    """The method's kind; None for a name the catalogue does not know."""
    info = _BY_NAME.get(name)
    return info.kind if info is not None else None


def check_method_names(methods: Sequence[str]) -> None:
    """Refuse names that are not methods (ValueError listing the available ones)."""
    unknown = [m for m in methods if m not in _BY_NAME]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(method_names())}")
