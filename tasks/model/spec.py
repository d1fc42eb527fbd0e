"""What model to load, as the command line names it: a plain record (no torch), so that a run's
request is checked, and Prefect's server started, before the heavy libraries load."""

from __future__ import annotations

from dataclasses import dataclass

from visaudit.tasks.model.errors import ModelError


@dataclass(frozen=True)
class ModelSpec:
    """What to load: ``arch`` (torchvision name, ``timm:NAME``, ``hf:PATH_OR_ID`` or ``torchscript:FILE``) or
    ``factory`` (``module:function`` or ``path/to/file.py:function``), and ``weights`` (a
    state_dict file, or for ``arch`` a torchvision weights name such as ``IMAGENET1K_V1``,
    or timm's ``pretrained`` / a timm pretrained tag)."""

    arch: str | None = None
    factory: str | None = None
    weights: str | None = None
    layer: str | None = None
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        if (self.arch is None) == (self.factory is None):
            raise ModelError("give exactly one of --arch (a torchvision architecture) or --model (module:function)")

    @property
    def name(self) -> str:
        """The architecture or factory named, for messages and fingerprints."""
        return self.arch or self.factory or "model"
