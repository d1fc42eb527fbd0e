"""The audit flow: index the data, audit it shard by shard, find, commit, report.

Read top to bottom, :func:`audit` is the story of a run. Tasks pass paths and small
values, never models or tensors (Prefect hashes task arguments); the model is loaded
once per process by :func:`visaudit.tasks.model.loading.load_model`'s cache.
"""


import hashlib
import json
import os
import platform
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from visaudit.tasks.data import storage
from visaudit.tasks.findings.calibration import reliability_of
from visaudit.tasks.explain.cam import GRADIENT_METHODS, GUIDED_METHODS, hooked_forward, linear_head
from visaudit.tasks.findings.detectors import Thresholds, compute_findings
from visaudit.tasks.findings.fixed_location import location_candidates, probe_location
from visaudit.tasks.data.images import Decoded, Preprocess, decode_many, normalise, to_batch
from visaudit.tasks.explain.impressions import choose_classes
from visaudit.tasks.explain.occlusion import OcclusionSpec
from visaudit.tasks.model.loading import LoadedModel, ModelError, ModelSpec, default_preprocess, load_model, stage_layers
from visaudit.tasks.audit.shard import ShardResult, ShardSettings, audit_shard
from visaudit.tasks.data.sources import (
    DataSourceError,
    build_index,
    class_names_from_index,
    read_class_file,
    read_index,
    write_index,
)

RUN_METRICS = ("images", "audited", "unreadable", "accuracy", "top5_accuracy", "ece")  # per-run trend rows
METHODS = (
    "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "counterfactual", "cam",
    "guided_backprop", "guided_gradcam", "occlusion", "impressions",
)


class AuditRequest(BaseModel):
    """Everything a run needs, as plain values (the flow's parameters)."""

    source: str
    out_dir: str
    arch: str | None = None
    model: str | None = None
    weights: str | None = None
    layer: str | None = None
    classes_file: str | None = None
    run_id: str | None = None
    device: str = "auto"
    batch_size: int = Field(32, ge=1, le=4096)
    shard_size: int = Field(256, ge=1, le=1_000_000)
    resize: int | None = Field(None, ge=8)
    crop: int | None = Field(None, ge=8)
    multi_label: bool | None = None
    methods: list[str] = Field(default_factory=lambda: ["gradcam"])
    layer_by_layer: bool = False
    targets: list[str] = Field(default_factory=lambda: ["predicted", "true"])
    target_classes: list[str] = Field(default_factory=list)
    thresholds: dict[str, float] = Field(default_factory=dict)
    template_dir: str | None = None
    pdf: bool = True
    trust_checkpoint: bool = False
    allow_outside_paths: bool = False  # manifest paths may climb out of the manifest's folder (../)
    runner: str = Field("threads", pattern="^(threads|dask)$")  # where the shard tasks run
    precision: str = Field("auto", pattern="^(auto|fp32)$")  # auto: bf16 autocast on CUDA, fp32 on the CPU
    gpu_decode: bool = True  # on CUDA, JPEG files are decoded on the GPU (nvJPEG)
    dask_address: str | None = None  # an existing Dask scheduler (default: a LocalCluster)
    dask_workers: int = Field(2, ge=1, le=1024)  # LocalCluster worker processes (one per GPU on CUDA)
    decode_workers: int = Field(4, ge=1, le=64)
    occlusion_grid: int = Field(7, ge=1, le=64)
    occlusion_window: int | None = Field(None, ge=1)
    occlusion_stride: int | None = Field(None, ge=1)
    occlusion_baseline: str = Field("zero", pattern="^(zero|mean|blur)$")
    rise_images: int = Field(16, ge=0, le=1024)  # deletion/insertion sample (with occlusion); 0 = off
    sanity_check: bool = True
    sanity_images: int = Field(16, ge=2, le=256)
    impression_classes: list[str] = Field(default_factory=list)  # default: every class up to the cap
    impression_max_classes: int = Field(16, ge=1, le=1000)
    impression_iterations: int = Field(200, ge=1, le=100_000)
    impression_tv_weight: float = Field(10.0, ge=0, le=1e6)
    impression_seed: int = 0
    impression_options: dict[str, Any] = Field(default_factory=dict)  # other ImpressionSettings fields

    def impression_settings(self, image_size: int) -> "ImpressionSettings":  # noqa: F821
        """The impressions' settings at the model's input size; a bad option is a ValueError."""
        from visaudit.tasks.explain.impressions import ImpressionSettings, settings_for_input

        dedicated = {"iterations": "--impression-iterations", "tv_weight": "--impression-tv-weight",
                     "seed": "--impression-seed", "image_size": "--crop (the model's input size)"}
        if clash := [name for name in self.impression_options if name in dedicated]:
            raise ValueError(f"impression option(s) {clash} have their own setting: "
                             f"{', '.join(dedicated[name] for name in clash)}")
        known = set(ImpressionSettings.__dataclass_fields__) - set(dedicated)
        if unknown := sorted(set(self.impression_options) - known):
            raise ValueError(f"unknown impression option(s) {unknown}; available: {', '.join(sorted(known))}")
        return settings_for_input(image_size, iterations=self.impression_iterations,
                                  tv_weight=self.impression_tv_weight, seed=self.impression_seed,
                                  **self.impression_options)

    def occlusion_spec(self) -> OcclusionSpec:
        if self.occlusion_window is not None:
            return OcclusionSpec(window=self.occlusion_window, stride=self.occlusion_stride,
                                 baseline=self.occlusion_baseline)
        if self.occlusion_stride is not None:
            raise ValueError("--occlusion-stride needs --occlusion-window")
        return OcclusionSpec(grid=self.occlusion_grid, baseline=self.occlusion_baseline)

    def model_spec(self) -> ModelSpec:
        return ModelSpec(
            arch=self.arch, factory=self.model, weights=self.weights,
            layer=self.layer, trust_checkpoint=self.trust_checkpoint,
        )


@dataclass
class RunPlan:
    """The validated plan of a run, saved beside its staged parts so a restart reuses it."""

    run_id: str
    out_dir: str
    request: dict
    classes: list[str]
    preprocess: dict
    multi_label: bool
    layers: list[str]  # hooked layers, shallow to deep; the explained layer last
    model_fingerprint: str
    data_fingerprint: str
    images: int
    shards: list[tuple[str, int, int]]
    started: str

    @property
    def folder(self) -> Path:
        return plan_dir(Path(self.out_dir), self.run_id)

    def shard_settings(self) -> ShardSettings:
        request = AuditRequest(**self.request)
        return ShardSettings(
            classes=tuple(self.classes),
            preprocess=Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.preprocess.items()}),
            multi_label=self.multi_label,
            batch_size=request.batch_size,
            decode_workers=request.decode_workers,
            methods=tuple(request.methods),
            layer=self.layers[-1],
            stages=tuple(self.layers[:-1]),
            targets=tuple(request.targets),
            target_classes=tuple(request.target_classes),
            occlusion=request.occlusion_spec() if "occlusion" in request.methods else None,
            precision=request.precision,
            gpu_decode=request.gpu_decode,
        )


def new_run_id() -> str:
    """Sortable, never all digits (so Hive partitioning reads it as a string)."""
    return f"r{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def plan_dir(out_dir: Path, run_id: str) -> Path:
    """Hidden folder holding a run's plan and index until the run is committed."""
    return Path(out_dir) / "runs" / f".staging-{run_id}"


def prepare_run(request: AuditRequest) -> RunPlan:
    """Validate the request, index the data, load the model once, and save the plan.

    Raises :class:`DataSourceError` or :class:`ModelError` with a one-line message for bad
    input. A plan saved by an earlier attempt of the same run is reused as is.
    """
    run_id = request.run_id or new_run_id()
    folder = plan_dir(Path(request.out_dir), run_id)
    if (folder / "plan.json").exists():
        return load_plan(folder)
    unknown = [m for m in request.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    known = set(Thresholds.__dataclass_fields__)
    bad = [k for k in request.thresholds if k not in known]
    if bad:
        raise ValueError(f"unknown threshold(s) {bad}; available: {', '.join(sorted(known))}")
    index = build_index(request.source, allow_outside=request.allow_outside_paths)
    loaded = load_model(request.model_spec(), request.device, request.crop or 224)
    preprocess = default_preprocess(loaded, request.resize, request.crop)
    if request.classes_file:
        classes = read_class_file(Path(request.classes_file))
    elif loaded.categories:
        classes = loaded.categories
    else:
        classes = class_names_from_index(index)
    if len(classes) != loaded.num_classes:
        raise ModelError(
            f"the model has {loaded.num_classes} outputs but {len(classes)} class names were found "
            f"({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}); pass --classes FILE "
            "with the model's class names, one per line, in output order"
        )
    unknown_targets = [c for c in request.target_classes if c not in classes]
    if unknown_targets:
        raise ValueError(f"--target-class {unknown_targets}: not among the model's classes ({', '.join(classes[:8])}, ...)")
    bad_targets = [t for t in request.targets if t not in ("predicted", "true") and not re.fullmatch(r"top\d+", t)]
    if bad_targets:
        raise ValueError(f"--targets {bad_targets}: use predicted, true and/or top<k> (e.g. top3)")
    layer = loaded.layers[-1]
    layers = []
    if request.layer_by_layer:  # one stage per resolution: the explained layer stands for its own
        shapes = loaded.layer_shapes
        layers = [s for s in stage_layers(shapes, loaded.model) if s != layer and shapes[s] != shapes.get(layer)]
    layers.append(layer)
    if any(m in GRADIENT_METHODS or m in GUIDED_METHODS for m in request.methods) or len(layers) > 1:
        check_gradients_reach(loaded, layers, preprocess.crop)
    if "cam" in request.methods:
        check_cam_applies(loaded, layer, preprocess.crop)
    if "occlusion" in request.methods:
        request.occlusion_spec().geometry(preprocess.crop)  # a window that does not fit fails here
    if "impressions" in request.methods:
        choose_classes(classes, request.impression_classes, request.impression_max_classes)  # unknown names fail here
        request.impression_settings(preprocess.crop)  # and bad options here
    if {"guided_backprop", "guided_gradcam"} & set(request.methods):
        import torch

        if not any(isinstance(m, torch.nn.ReLU) for m in loaded.model.modules()):
            raise ModelError(
                "guided backprop needs nn.ReLU modules and this model has none (it may call F.relu); "
                "drop guided_backprop/guided_gradcam from --methods"
            )
    multi_label = request.multi_label
    if multi_label is None:
        multi_label = bool((index["labels"].map(len) > 1).any())
    shards = [
        (f"{i // request.shard_size:05d}", i, min(i + request.shard_size, len(index)))
        for i in range(0, len(index), request.shard_size)
    ]
    fingerprint = hashlib.sha256(
        pd.util.hash_pandas_object(index[["uri"]].assign(labels=index["labels"].map(";".join)), index=False)
        .to_numpy()
        .tobytes()
    ).hexdigest()
    plan = RunPlan(
        run_id=run_id,
        out_dir=str(Path(request.out_dir).resolve()),
        request=request.model_dump() | {"run_id": run_id},
        classes=list(classes),
        preprocess=asdict(preprocess),
        multi_label=multi_label,
        layers=layers,
        model_fingerprint=loaded.fingerprint,
        data_fingerprint=fingerprint,
        images=len(index),
        shards=shards,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_index(index, folder / "index.parquet")
    tmp = folder / "plan.json.tmp"
    tmp.write_text(json.dumps(asdict(plan), indent=2))
    os.replace(tmp, folder / "plan.json")
    return plan


def check_gradients_reach(loaded: LoadedModel, layers: list[str], size: int) -> None:
    """Gradient methods need the class scores to depend, through autograd, on each explained
    layer; a model that detaches its backbone (or runs it under no_grad) is refused early."""
    generator = torch.Generator().manual_seed(0)
    probe_input = torch.randn(1, 3, size, size, generator=generator).to(loaded.device)
    forward = hooked_forward(loaded.model, probe_input, layers)
    acts = [forward.activations[name] for name in layers]
    blocked = [name for name, a in zip(layers, acts) if not a.requires_grad]
    if forward.scores.requires_grad and not blocked:
        grads = torch.autograd.grad(forward.scores.sum(), acts, allow_unused=True)
        blocked = [name for name, g in zip(layers, grads) if g is None]
    elif not blocked:
        blocked = list(layers)
    if blocked:
        raise ModelError(
            f"--layer {blocked[-1]!r}: the class scores do not depend on this layer through autograd (the model "
            "detaches its output or runs it under torch.no_grad), so gradient methods cannot explain it; "
            "remove the .detach()/no_grad from the model's forward, choose a later layer with --layer, "
            "or use --methods occlusion"
        )


def check_cam_applies(loaded: LoadedModel, layer: str, size: int) -> None:
    """CAM needs a global-average-pool + linear head on the explained layer; say so early if not."""
    generator = torch.Generator().manual_seed(0)
    probe_input = torch.randn(2, 3, size, size, generator=generator).to(loaded.device)
    if linear_head(loaded.model, hooked_forward(loaded.model, probe_input, [layer]), layer) is None:
        raise ModelError(
            f"CAM does not apply to this model: its head on {layer!r} is not global-average-pool + linear; "
            "use --methods gradcam (Grad-CAM equals CAM on such heads)"
        )


def load_plan(folder: Path) -> RunPlan:
    data = json.loads((folder / "plan.json").read_text())
    data["shards"] = [tuple(s) for s in data["shards"]]
    return RunPlan(**data)


def run_shard(plan_folder: str, shard: str, start: int, stop: int) -> ShardResult:
    """Audit one shard of the planned run (the model comes from the per-process cache)."""
    plan = load_plan(Path(plan_folder))
    request = AuditRequest(**plan.request)
    loaded = load_model(request.model_spec(), worker_device(request.device), request.crop or 224)
    rows = read_index(Path(plan_folder) / "index.parquet", start, stop)
    return audit_shard(rows, loaded, plan.shard_settings(), Path(plan.out_dir), plan.run_id, shard)


def worker_device(device: str) -> str:
    """On a Dask worker of a multi-GPU LocalCluster, the worker's own GPU (worker i -> cuda:i
    modulo the GPUs); elsewhere the device as asked."""
    if device not in ("auto", "cuda") or torch.cuda.device_count() < 2:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device
    return f"cuda:{int(name) % torch.cuda.device_count()}" if str(name).isdigit() else device


def find(plan: RunPlan) -> int:
    """Compute findings over the run's staged tables and stage them; returns how many.

    The fixed-location detector also needs the model: its candidate spots are probed by
    muting them on sample images of the class (tasks/fixed_location.py).
    """
    request = AuditRequest(**plan.request)
    out_dir = Path(plan.out_dir)
    staged = {t: storage.read_staged(t, out_dir, plan.run_id)
              for t in ("predictions", "explanations", "signals", "occlusion", "metrics")}
    thresholds = Thresholds(**request.thresholds)
    predictions, explanations = staged["predictions"], staged["explanations"]
    audited = predictions[predictions["error"].isna()]
    at_layer = explanations[explanations["layer"] == plan.layers[-1]]
    candidates = location_candidates(audited, at_layer, thresholds)
    probes = {}
    if candidates:
        loaded = load_model(request.model_spec(), request.device, request.crop or 224)
        uris = predictions.set_index("image_id")["uri"]
        for candidate in candidates:
            inputs = load_inputs(plan, loaded, uris.loc[list(candidate.sample_ids)].tolist())
            if len(inputs) >= 2:
                probes[candidate.class_name] = probe_location(
                    loaded.model, inputs, plan.classes.index(candidate.class_name),
                    candidate.x, candidate.y, plan.multi_label, thresholds.fixed_location_patch_ratio,
                )
    findings = compute_findings(
        predictions, explanations, plan.classes, thresholds, plan.multi_label, layer=plan.layers[-1],
        signals=staged["signals"], occlusion=staged["occlusion"], metrics=staged["metrics"],
        locations=(candidates, probes),
    )
    if probes:  # every probed candidate's numbers, flagged or not, for the record
        storage.write_part(location_metrics(candidates, probes, plan.layers[-1]), "metrics", out_dir, plan.run_id,
                           "locations")
    storage.write_part(findings, "findings", out_dir, plan.run_id, "00000")
    return len(findings)


def location_metrics(candidates, probes, layer: str) -> pd.DataFrame:
    """``metrics`` rows of the fixed-location probes: peak share, patch ratio, drops, flips."""
    rows = []
    for c in candidates:
        probe = probes.get(c.class_name)
        if probe is None:
            continue
        for metric, value in (("fixed_location_peak_share", c.share), ("fixed_location_patch_ratio", probe.patch_ratio),
                              ("fixed_location_drop", probe.drop), ("fixed_location_control_drop", probe.control_drop),
                              ("fixed_location_flip_share", probe.flip_share)):
            rows.append(dict(metric=metric, method="gradcam", layer=layer, class_name=c.class_name,
                             detail=f"spot=({probe.x:.2f}, {probe.y:.2f})", value=float(value), images=probe.images))
    return pd.DataFrame(rows).astype({"images": "int32"})


def load_inputs(plan: RunPlan, loaded: LoadedModel, uris: list[str]):
    """The readable images among ``uris``, preprocessed, as one batch on the device."""
    settings = plan.shard_settings()
    decoded = [d for d in decode_many(uris, settings.preprocess, settings.decode_workers) if isinstance(d, Decoded)]
    if not decoded:
        return torch.zeros(0, 3, settings.preprocess.crop, settings.preprocess.crop, device=loaded.device)
    return normalise(to_batch(decoded, loaded.device), settings.preprocess)


def sample_inputs(plan: RunPlan, loaded: LoadedModel, count: int):
    """The first ``count`` readable images of the run, preprocessed, as one batch on the device."""
    index = read_index(plan.folder / "index.parquet")
    batches = []
    found = 0
    for start in range(0, len(index), count):
        batch = load_inputs(plan, loaded, index["uri"].iloc[start : start + count].tolist())
        batches.append(batch)
        found += len(batch)
        if found >= count:
            break
    return torch.cat(batches)[:count] if batches else load_inputs(plan, loaded, [])


def sanity(plan: RunPlan) -> int:
    """Model-randomisation sanity check of the run's methods; staged as ``metrics`` rows."""
    from visaudit.tasks.explain.sanity import sanity_check

    request = AuditRequest(**plan.request)
    methods = tuple(m for m in request.methods if m in GRADIENT_METHODS or m in GUIDED_METHODS)
    if not request.sanity_check or not methods:
        return 0
    loaded = load_model(request.model_spec(), request.device, request.crop or 224)
    inputs = sample_inputs(plan, loaded, request.sanity_images)
    if inputs.shape[0] < 2:
        return 0
    stages = stage_layers(loaded.layer_shapes, loaded.model)
    result = sanity_check(loaded.model, inputs, plan.layers[-1], stages, methods)
    rows = pd.DataFrame(
        {
            "metric": "sanity_spearman",
            "method": result["method"],
            "layer": result["layer"],
            "class_name": None,
            "detail": result["step"].astype(str) + ":" + result["randomised"],
            "value": result["spearman_mean"],
            "images": result["images"].astype("int32"),
        }
    )
    storage.write_part(rows, "metrics", Path(plan.out_dir), plan.run_id, "sanity")
    return len(rows)


def rise(plan: RunPlan) -> int:
    """RISE deletion and insertion AUC of Grad-CAM and occlusion for the predicted class, on
    the first ``rise_images`` readable images; staged as ``metrics`` rows (mean per method)."""
    from visaudit.tasks.explain import cam
    from visaudit.tasks.explain import occlusion

    request = AuditRequest(**plan.request)
    if "occlusion" not in request.methods or request.rise_images < 1:
        return 0
    loaded = load_model(request.model_spec(), request.device, request.crop or 224)
    inputs = sample_inputs(plan, loaded, request.rise_images)
    if inputs.shape[0] == 0:
        return 0
    layer = plan.layers[-1]
    activation = "sigmoid" if plan.multi_label else "softmax"
    forward = cam.hooked_forward(loaded.model, inputs, [layer])
    target = forward.scores.detach().argmax(dim=1)
    sample = torch.arange(inputs.shape[0], device=inputs.device)
    saliency = {
        "gradcam": cam.grad_cam(forward, sample, target)[layer].detach(),
        "occlusion": occlusion.occlusion_maps(loaded.model, inputs, request.occlusion_spec(), activation=activation)
        .maps(sample, target)
        .clamp(min=0),
    }
    rows = []
    for method, maps in saliency.items():
        scores = occlusion.deletion_insertion(loaded.model, inputs, maps, target, activation=activation)
        for metric, values in (("deletion_auc", scores.deletion_auc), ("insertion_auc", scores.insertion_auc)):
            rows.append({"metric": metric, "method": method, "layer": layer if method == "gradcam" else "input",
                         "class_name": None, "detail": "predicted class", "value": float(values.mean()),
                         "images": int(values.numel())})
    storage.write_part(pd.DataFrame(rows).astype({"images": "int32"}), "metrics", Path(plan.out_dir), plan.run_id, "rise")
    return len(rows)


def impressions(plan: RunPlan) -> int:
    """Class impressions (one batch over the chosen classes) with their Grad-CAM and colour
    impressions; PNGs beside the plan, rows staged as ``impressions``. Returns how many."""
    from visaudit.tasks.explain.impressions import class_impressions, colour_impressions, impression_cam, impression_table, save_pngs

    request = AuditRequest(**plan.request)
    if "impressions" not in request.methods:
        return 0
    index = read_index(plan.folder / "index.parquet")
    counts = index["labels"].explode().value_counts().to_dict()
    classes = choose_classes(plan.classes, request.impression_classes, request.impression_max_classes, counts)
    settings = plan.shard_settings()
    pre = settings.preprocess
    loaded = load_model(request.model_spec(), request.device, request.crop or 224)
    options = request.impression_settings(pre.crop)
    result = class_impressions(loaded.model, classes, options, pre.mean, pre.std, loaded.device,
                               multi_label=plan.multi_label)
    colours = colour_impressions(loaded.model, classes, options, pre.mean, pre.std, loaded.device,
                                 multi_label=plan.multi_label) if options.colour_levels else None
    located = impression_cam(loaded.model, result.images, classes, settings.layer, pre.mean, pre.std)
    paths = save_pngs(result, plan.classes, plan.folder / IMPRESSIONS_DIR)
    table = impression_table(result, located, plan.classes, [f"{IMPRESSIONS_DIR}/{path.name}" for path in paths],
                             colours)
    storage.write_part(table, "impressions", Path(plan.out_dir), plan.run_id, "00000")
    return len(table)


IMPRESSIONS_DIR = "impressions"
FEATURE_IMAGES = 4


def feature_views(plan: RunPlan) -> int:
    """First-layer filters and the most active channels of a few shown images (finding
    evidence first, then the most confident failures), written beside the plan."""
    from visaudit.tasks.explain.features import write_feature_views
    from visaudit.tasks.data.images import Decoded, decode_many, normalise, to_batch

    out_dir = Path(plan.out_dir)
    request = AuditRequest(**plan.request)
    findings = storage.read_staged("findings", out_dir, plan.run_id)
    predictions = storage.read_staged("predictions", out_dir, plan.run_id)
    readable = predictions[predictions["error"].isna()]
    failures = readable[readable["correct"].eq(False).fillna(False).astype(bool)].sort_values(
        "confidence", ascending=False, kind="stable"
    )
    candidates = [ids[0] for ids in findings["evidence"] if ids is not None and len(ids)]
    candidates += failures["image_id"].tolist() + readable["image_id"].tolist()
    chosen = list(dict.fromkeys(candidates))[:FEATURE_IMAGES]
    if not chosen:
        return 0
    settings = plan.shard_settings()
    uris = readable.set_index("image_id").loc[chosen, "uri"].tolist()
    decoded = [d for d in decode_many(uris, settings.preprocess) if isinstance(d, Decoded)]
    if len(decoded) != len(chosen):
        return 0  # an image changed since its shard read it: skip the view rather than mislabel it
    loaded = load_model(request.model_spec(), request.device, request.crop or 224)
    inputs = normalise(to_batch(decoded, loaded.device), settings.preprocess)
    index = write_feature_views(
        loaded.model, inputs, [d.pixels for d in decoded], chosen, plan.layers[-1], plan.folder / "features"
    )
    return len(index["images"])


def summary_metrics(predictions: pd.DataFrame, multi_label: bool) -> dict[str, float | int | None]:
    """Headline numbers for run.json and the report."""
    audited = predictions[predictions["error"].isna()]
    judged = audited[audited["correct"].notna()]
    accuracy = float(judged["correct"].astype(bool).mean()) if len(judged) else None
    top5 = None
    if not multi_label and len(judged):
        top5 = float(
            sum(labels[0] in top for labels, top in zip(judged["labels"], judged["top_classes"])) / len(judged)
        )
    ece = None
    if not multi_label and len(judged):
        ece = reliability_of(judged).ece
    return {
        "images": int(len(predictions)),
        "audited": int(len(audited)),
        "unreadable": int(predictions["error"].notna().sum()),
        "accuracy": accuracy,
        "top5_accuracy": top5,
        "ece": ece,
    }


def run_metric_rows(summary: dict, findings: pd.DataFrame, series: str) -> pd.DataFrame:
    """The run's headline numbers as ``metrics`` rows (``detail`` = the series key, so that
    nightly runs of one model on one source line up as a trend)."""
    counts = findings["severity"].value_counts()
    values = {name: summary[name] for name in RUN_METRICS if name in summary}
    values |= {f"findings_{level}": int(counts.get(level, 0)) for level in ("high", "medium", "low")}
    rows = [dict(metric=name, method=None, layer=None, class_name=None, detail=series,
                 value=float("nan") if value is None else float(value), images=summary["audited"])
            for name, value in values.items()]
    return pd.DataFrame(rows).astype({"images": "int32"})


def series_key(model_fingerprint: str, source: str) -> str:
    """Which runs form one trend: the same model weights on the same data source."""
    return json.dumps({"model": model_fingerprint, "source": source}, sort_keys=True)


def commit(plan: RunPlan, timings: dict[str, float]) -> Path:
    """Make the run visible: write run.json, move staged tables into place, drop the plan."""
    import prefect
    import torchvision

    out_dir = Path(plan.out_dir)
    request = AuditRequest(**plan.request)
    predictions = storage.read_staged("predictions", out_dir, plan.run_id)
    run_dir = out_dir / "runs" / plan.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "run_id": plan.run_id,
        "started": plan.started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": request.arch or request.model,
            "weights": request.weights,
            "fingerprint": plan.model_fingerprint,
            "task": "multilabel" if plan.multi_label else "multiclass",
            "layers": plan.layers,
            "num_classes": len(plan.classes),
        },
        "data": {
            "source": request.source,
            "fingerprint": plan.data_fingerprint,
            "images": plan.images,
            "unreadable": int(predictions["error"].notna().sum()),
        },
        "classes": plan.classes,
        "preprocess": plan.preprocess,
        "parameters": {
            "methods": request.methods,
            "device": request.device,
            "batch_size": request.batch_size,
            "shard_size": request.shard_size,
            "thresholds": Thresholds(**request.thresholds).as_dict(),
            **({"impressions": {"classes": request.impression_classes or f"up to {request.impression_max_classes}",
                                **request.impression_settings(plan.preprocess["crop"]).as_dict()}}
               if "impressions" in request.methods else {}),
        },
        "versions": {
            "visaudit": _version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "prefect": prefect.__version__,
            "python": platform.python_version(),
        },
        "timings": timings,
        "metrics": summary_metrics(predictions, plan.multi_label),
    }
    for folder in ("features", IMPRESSIONS_DIR):  # figures made at audit time (they need the model)
        staged = plan.folder / folder
        if staged.is_dir():
            shutil.rmtree(run_dir / folder, ignore_errors=True)
            os.replace(staged, run_dir / folder)
    findings = storage.read_staged("findings", out_dir, plan.run_id)
    series = series_key(plan.model_fingerprint, request.source)
    storage.write_part(run_metric_rows(record["metrics"], findings, series), "metrics", out_dir, plan.run_id, "run")
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, run_dir / "run.json")
    storage.commit_run(out_dir, plan.run_id)
    shutil.rmtree(plan.folder, ignore_errors=True)
    return run_dir


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("visaudit")
    except PackageNotFoundError:
        return "0+unknown"


def render(out_dir: str, run_id: str, template_dir: str | None, pdf: bool) -> str:
    from visaudit.tasks.report.render import render_report

    paths = render_report(Path(out_dir), run_id, Path(template_dir) if template_dir else None, pdf=pdf)
    return str(paths.pdf or paths.html)


prepare_task = task(prepare_run, name="prepare", cache_policy=NO_CACHE)
shard_task = task(run_shard, name="audit-shard", cache_policy=NO_CACHE, task_run_name="shard-{shard}")
find_task = task(find, name="findings", cache_policy=NO_CACHE)
sanity_task = task(sanity, name="sanity-check", cache_policy=NO_CACHE)
impressions_task = task(impressions, name="class-impressions", cache_policy=NO_CACHE)
features_task = task(feature_views, name="feature-views", cache_policy=NO_CACHE)
rise_task = task(rise, name="deletion-insertion", cache_policy=NO_CACHE)
commit_task = task(commit, name="commit", cache_policy=NO_CACHE)
report_task = task(render, name="report", cache_policy=NO_CACHE)


@flow(name="visaudit-audit", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def audit(request: AuditRequest) -> str:
    """Audit a model on a data source; returns the run id. The story of a run:"""
    clock = time.perf_counter()
    timings: dict[str, float] = {}
    # 1. Validate, index the data, load the model once, and plan the shards.
    plan = prepare_task(request)
    timings["prepare"] = round(time.perf_counter() - clock, 3)
    # 2. Audit shard by shard: decode, one forward, predictions, Grad-CAM, Parquet parts.
    #    One worker per device: concurrent shards would only fight over it.
    futures = [shard_task.submit(str(plan.folder), name, start, stop) for name, start, stop in plan.shards]
    results = [future.result() for future in futures]  # resolving every future fails the flow on any failure
    timings["shards"] = round(time.perf_counter() - clock - timings["prepare"], 3)
    for stage in ("decode", "model", "rows", "write"):
        timings[f"shards.{stage}"] = round(sum(r.seconds.get(stage, 0.0) for r in results), 3)
    # 3. Sanity check: do the maps change when the model's weights are randomised?
    mark = time.perf_counter()
    sanity_task(plan)
    timings["sanity_check"] = round(time.perf_counter() - mark, 3)
    #    ... and RISE deletion/insertion of Grad-CAM and occlusion, when occlusion was asked for.
    mark = time.perf_counter()
    rise_task(plan)
    timings["deletion_insertion"] = round(time.perf_counter() - mark, 3)
    #    ... and class impressions: what the model has learnt for each class, from noise.
    mark = time.perf_counter()
    impressions_task(plan)
    timings["class_impressions"] = round(time.perf_counter() - mark, 3)
    # 4. Findings over the staged tables.
    mark = time.perf_counter()
    find_task(plan)
    timings["findings"] = round(time.perf_counter() - mark, 3)
    # 5. Feature views of a few shown images: first-layer filters, most active channels.
    mark = time.perf_counter()
    features_task(plan)
    timings["feature_views"] = round(time.perf_counter() - mark, 3)
    # 6. Commit: the run becomes visible to readers all at once.
    timings["total_before_report"] = round(time.perf_counter() - clock, 3)
    commit_task(plan, timings)
    # 7. Report from the committed tables (can be re-rendered later with `visaudit report`).
    report_task(plan.out_dir, plan.run_id, request.template_dir, request.pdf)
    return plan.run_id


def task_runner_for(request: AuditRequest):
    """The task runner a request asks for: one thread (the default: one device, no contention),
    or Dask: an existing scheduler, else a LocalCluster of worker processes, one per GPU when
    there are GPUs (dask-cuda's LocalCUDACluster where installed)."""
    if request.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=1)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ValueError("--runner dask needs prefect-dask: pip install 'visaudit[dask]'") from None

    if request.dask_address:
        return DaskTaskRunner(address=request.dask_address)
    gpus = torch.cuda.device_count() if request.device in ("auto", "cuda") else 0
    if gpus:
        try:
            import dask_cuda  # noqa: F401

            return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster")
        except ImportError:
            pass
    workers = gpus or request.dask_workers
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


def run_audit(request: AuditRequest) -> str:
    """Run the audit flow on the request's task runner; returns the run id. Dask's process
    workers need a real Prefect API: PREFECT_API_URL's, or a local server for the run."""
    from visaudit.flows.server import pin_ephemeral_port, shared_api

    if request.runner == "threads":
        pin_ephemeral_port()
        return audit(request)
    import logging

    logging.getLogger("distributed").setLevel(logging.WARNING)  # cluster start/stop chatter
    with shared_api():
        return audit.with_options(task_runner=task_runner_for(request))(request)


__all__ = ["AuditRequest", "DataSourceError", "ModelError", "RunPlan", "audit", "prepare_run", "run_audit"]
