"""What a run is asked to do: the :class:`AuditRequest`, in settings groups.

Each group is one concern (the model, the compute, the explanations, occlusion, the sanity
check, class impressions, the report). Every field carries the description the command line
shows and the name of its option (``flag``), so ``visaudit run``'s options are generated from
these classes (``visaudit.flows.options``) instead of being copied by hand.

A request can be written nested (``{"model": {"arch": "resnet18"}}``) or flat, with the run
options' names or the fields' own (``arch="resnet18"``, ``classes="c.txt"`` or
``classes_file="c.txt"``, ``methods="gradcam,occlusion"``): flat keys are routed into their
group, so a TOML config and a Python caller use the names the command line uses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from visaudit.tasks.audit.method_settings import (
    AdversarialSettings,
    ImpressionRequest,
    MilSettings,
    OcclusionSettings,
    SanitySettings,
)
from visaudit.tasks.audit.settings import Settings, flat_names, option, split_list
from visaudit.tasks.data.reads import Limits, ReadPolicy
from visaudit.tasks.findings.thresholds import Thresholds

if TYPE_CHECKING:  # the command line's --help and option parsing read this module: torch and pandas load on use
    from visaudit.tasks.audit.gate import GatePolicy
    from visaudit.tasks.audit.setup_report import SetupThresholds
    from visaudit.tasks.model.spec import ModelSpec


class ModelSettings(Settings):
    """The model to audit and how its inputs are prepared."""

    title: ClassVar[str] = "Model"
    arch: str | None = option(None, "torchvision architecture name (resnet18, vit_b_16, swin_t, ...), "
                                    "timm:NAME (pip install 'visaudit[timm]'), hf:PATH_OR_ID, a Hugging Face "
                                    "image classifier folder or hub id (pip install 'visaudit[hf]'), or "
                                    "torchscript:FILE, a torch.jit.save archive (no layer: model-agnostic "
                                    "methods only).")
    model: str | None = option(None, "Model factory 'package.module:function' or 'path/to/file.py:function'.")
    weights: str | None = option(None, "state_dict file, or a torchvision weights name such as IMAGENET1K_V1.")
    layer: str | None = option(None, "Layer to explain (default: the last spatial conv stage).")
    classes_file: str | None = option(None, "File with class names, one per line, in the model's output order.",
                                      flag="classes")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    resize: int | None = option(None, "Resize the shorter side to this (default: weights' or 256).", ge=8)
    crop: int | None = option(None, "Centre crop size (default: weights' or 224).", ge=8)
    normalise: str | None = option(None, "Input scaling: imagenet (mean/std), unit ([0, 1]), symmetric ([-1, 1]) "
                                   "(default: the weights' or imagenet).", pattern="^(imagenet|unit|symmetric)$")
    channels: str = option("rgb", "Colour channel order the model expects: rgb or bgr.", pattern="^(rgb|bgr)$")
    multi_label: bool | None = option(None, "Sigmoid or softmax model (default: from the labels).",
                                      form="switch:--multi-label/--multi-class")
    trust_checkpoint: bool = option(False, "Allow weights files that are full pickles (they can run code).")

    def spec(self) -> ModelSpec:
        """The loader's view of the model (a bad combination is a ModelError)."""
        from visaudit.tasks.model.spec import ModelSpec

        return ModelSpec(arch=self.arch, factory=self.model, weights=self.weights, layer=self.layer,
                         trust_checkpoint=self.trust_checkpoint)

    @property
    def input_size(self) -> int:
        """The input size the model is probed at before its preprocessing is known."""
        return self.crop or 224


class ComputeSettings(Settings):
    """Where and how fast the work runs."""

    title: ClassVar[str] = "Compute"
    batch_size: int = option(32, "Images per forward pass.", ge=1, le=4096)
    shard_size: int = option(256, "Images per Prefect task.", ge=1, le=1_000_000)
    decode_workers: int = option(4, "Threads decoding images.", ge=1, le=64)
    precision: str = option("auto", "auto: bf16 autocast on CUDA (maps in float32), fp32 on the CPU; or fp32.",
                            pattern="^(auto|fp32)$")
    gpu_decode: bool = option(True, "On CUDA, decode JPEG files on the GPU (nvJPEG).",
                              form="switch:--gpu-decode/--no-gpu-decode")
    runner: str = option("threads", "Where shard tasks run: threads (one device) or dask.", pattern="^(threads|dask)$")
    dask_address: str | None = option(None, "An existing Dask scheduler (tcp://host:8786).")
    dask_workers: int = option(2, "LocalCluster worker processes (default 2; one per GPU).", ge=1, le=1024)


class DataSettings(Settings):
    """How the data source is read."""

    title: ClassVar[str] = "Data"
    allow_outside_paths: bool = option(
        False, "Let a manifest name files outside its folder (../, absolute paths, symlinks out), or, from a "
        "remote manifest, local files and other origins' images; only for manifests you trust.")
    max_image_bytes: int = option(Limits.image_bytes, "Largest image file read, in bytes (larger: recorded as an "
                                  "error).", ge=1)
    max_manifest_bytes: int = option(Limits.manifest_bytes, "Largest manifest read, in bytes.", ge=1)
    http_deadline: float = option(Limits.http_deadline_s, "Seconds one http(s) request may take in all (connect, "
                                  "headers, body); a slower one is retried, then recorded.", gt=0, le=3600)
    max_aspect_ratio: float = option(Limits.max_aspect_ratio, "Longest side / shortest side an image may have; "
                                     "checked before decoding (larger: recorded as an error).", ge=1)

    def limits(self) -> Limits:
        """The byte, time and shape limits of the run's reads."""
        return Limits(self.max_image_bytes, self.max_manifest_bytes, self.http_deadline, self.max_aspect_ratio)

    def read_policy(self, source: str) -> ReadPolicy:
        """Where the run over ``source`` may read, with these limits."""
        from visaudit.tasks.data.sources import read_policy

        return read_policy(source, self.allow_outside_paths, self.limits())


class ExplainSettings(Settings):
    """Which explanations are computed, for which classes."""

    title: ClassVar[str] = "Explanations"
    methods: list[str] = option(["gradcam"], "Comma-separated explanation methods (see the README's Methods).",
                                form="comma")
    layer_by_layer: bool = option(False, "Also Grad-CAM at each of the 4 deepest stages (same backward pass).")
    targets: list[str] = option(["predicted", "true"], "Classes to explain per image: predicted, true, top<k>.",
                                form="comma")
    target_classes: list[str] = option([], "Also explain this class for every image (repeatable).",
                                       flag="target-class", form="repeat")
    wsl_threshold: float = option(0.15, "Weakly supervised localisation: binarise each map at this fraction of its "
                                  "maximum, box the largest segment (0.15 in the CAM and Grad-CAM papers).",
                                  gt=0, le=1)

    _split_lists = field_validator("methods", "targets", mode="before")(lambda cls, value: split_list(value))

    @field_validator("methods")
    @classmethod
    def _some_method(cls, methods: list[str]) -> list[str]:
        if not methods:
            raise ValueError("no method given; name at least one, e.g. --methods gradcam")
        return methods

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        if bad := [t for t in targets if t not in ("predicted", "true") and not re.fullmatch(r"top\d+", t)]:
            raise ValueError(f"{bad}: use predicted, true and/or top<k> (e.g. top3)")
        return targets


class SetupSettings(Settings):
    """The setup checks on a probe of labelled images before the shards (``audit.setup_checks``)."""

    title: ClassVar[str] = "Setup checks"
    enabled: bool = option(True, "Check the preprocessing and class order on a probe first; stop when an "
                           "alternative is clearly better.", key="setup_checks",
                           form="switch:--setup-checks/--no-setup-checks")
    probe_images: int = option(200, "Setup checks: labelled images in the probe.", key="setup_probe", flag="setup-probe", ge=2, le=10_000)
    min_gain: float = option(0.20, "Setup checks: accuracy gain the interval's lower end must clear.",
                             key="setup_gain", flag="setup-gain", ge=0, le=1)
    max_loss_ratio: float = option(0.5, "Setup checks: an alternative's mean loss at most this times the given's.",
                                   key="setup_loss_ratio", flag="setup-loss-ratio", gt=0, le=1)
    confidence: float = option(0.95, "Setup checks: confidence of the intervals.", key="setup_confidence",
                               flag="setup-confidence", gt=0.5, lt=1)

    def thresholds(self) -> SetupThresholds:
        from visaudit.tasks.audit.setup_report import SetupThresholds

        return SetupThresholds(probe_images=self.probe_images, min_gain=self.min_gain,
                               max_loss_ratio=self.max_loss_ratio, confidence=self.confidence)


class ReportSettings(Settings):
    """How the report is rendered."""

    title: ClassVar[str] = "Report"
    template_dir: str | None = option(None, "Folder with your own report.html.j2 and report.css.", flag="templates")
    pdf: bool = option(True, "Also render the PDF.", form="switch:--pdf/--no-pdf")


class GateSettings(Settings):
    """The release gate judged after the run is committed (``audit.gate``)."""

    title: ClassVar[str] = "Release gate"
    fail_on: str | None = option(None, "Fail the run (exit code 3) when it has findings at this severity or above: "
                                 "high, medium or low.", pattern="^(high|medium|low)$")
    policy: str | None = option(None, "Release policy TOML (finding severities and kinds, metric floors such as "
                                "accuracy = 0.9); --fail-on overrides its severity.")

    @field_validator("policy")
    @classmethod
    def _readable_policy(cls, path: str | None) -> str | None:
        if path is not None:
            from visaudit.tasks.audit.gate import load_policy

            load_policy(Path(path))  # a bad file fails now, not after the audit
        return path

    def gate_policy(self) -> GatePolicy | None:
        """The policy to judge the run by, or None when none was asked for."""
        if self.policy is None and self.fail_on is None:
            return None
        from visaudit.tasks.audit.gate import GatePolicy, load_policy

        policy = load_policy(Path(self.policy)) if self.policy else GatePolicy()
        return policy.model_copy(update={"fail_on": self.fail_on}) if self.fail_on else policy


class EventSettings(Settings):
    """The Prefect events a run emits about the change since the series' previous run."""

    title: ClassVar[str] = "Prefect events"
    drop_margin: float = option(0.02, "Emit visaudit.metric.dropped when accuracy or a class's accuracy falls by "
                                "more than this since the series' previous run (and the paired 95% interval "
                                "excludes zero).", gt=0, lt=1)


GROUPS: dict[str, type[Settings]] = {
    "model": ModelSettings, "compute": ComputeSettings, "data": DataSettings, "explain": ExplainSettings,
    "occlusion": OcclusionSettings, "mil": MilSettings, "adversarial": AdversarialSettings,
    "sanity": SanitySettings, "impressions": ImpressionRequest,
    "setup": SetupSettings, "report": ReportSettings, "gate": GateSettings, "events": EventSettings,
}


def _flat_keys() -> dict[str, tuple[str, str]]:
    keys: dict[str, tuple[str, str]] = {}
    for group_name, group in GROUPS.items():
        for field in group.model_fields:
            for name in flat_names(group, field):
                if keys.setdefault(name, (group_name, field)) != (group_name, field):
                    raise AssertionError(f"flat name {name!r} is claimed twice")
    return keys


FLAT_KEYS: dict[str, tuple[str, str]] = _flat_keys()  # flat name -> (group, field)


class AuditRequest(BaseModel):
    """Everything a run needs, as plain values (the flow's parameters)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Class-per-folder directory, or a .csv/.parquet manifest (path or URL).")
    out_dir: str = option("visaudit-out", "Output folder (tables/ and runs/).", flag="out")
    run_id: str | None = option(None, "Resume or name a run (default: a new id).")
    series: str | None = option(None, "Name the trend series this run belongs to (default: the model and source).")
    thresholds: dict[str, float] = option({}, "Override a finding threshold, NAME=VALUE (repeatable).",
                                          flag="threshold", form="pairs")
    model: ModelSettings = Field(default_factory=ModelSettings)
    compute: ComputeSettings = Field(default_factory=ComputeSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    explain: ExplainSettings = Field(default_factory=ExplainSettings)
    occlusion: OcclusionSettings = Field(default_factory=OcclusionSettings)
    mil: MilSettings = Field(default_factory=MilSettings)
    adversarial: AdversarialSettings = Field(default_factory=AdversarialSettings)
    sanity: SanitySettings = Field(default_factory=SanitySettings)
    impressions: ImpressionRequest = Field(default_factory=ImpressionRequest)
    setup: SetupSettings = Field(default_factory=SetupSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    events: EventSettings = Field(default_factory=EventSettings)

    @model_validator(mode="before")
    @classmethod
    def _route_flat_keys(cls, data: Any) -> Any:
        """Flat keys (``arch``, ``impression_iterations``, ``classes``...) go to their group."""
        if not isinstance(data, dict):
            return data
        routed: dict[str, Any] = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            top = {"out": "out_dir", "threshold": "thresholds"}.get(name, name)
            if name in FLAT_KEYS and (top not in cls.model_fields or not isinstance(value, (dict, BaseModel))):
                group, field = FLAT_KEYS[name]
                routed.setdefault(group, {})[field] = value
            elif top in cls.model_fields:
                if top in GROUPS and isinstance(value, BaseModel):
                    value = value.model_dump()
                if top in GROUPS and isinstance(value, dict):
                    routed.setdefault(top, {}).update(value)
                else:
                    routed[top] = value
            else:
                routed[key] = value  # refused below, with its name
        return routed

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, thresholds: dict[str, float]) -> dict[str, float]:
        known = set(Thresholds.__dataclass_fields__)
        if bad := [k for k in thresholds if k not in known]:
            raise ValueError(f"unknown threshold(s) {bad}; available: {', '.join(sorted(known))}")
        Thresholds(**thresholds)  # NaN, infinite or out-of-range values are refused with their name
        return thresholds

    def finding_thresholds(self) -> Thresholds:
        return Thresholds(**self.thresholds)
