"""The plan of a run: the request validated, the data indexed, the model checked, the shards cut.

:func:`prepare_run` does it once and saves the plan beside the run's staged parts, so a
restarted run (same ``--run-id``) reuses the plan and the shards already done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from pydantic import BaseModel

from visaudit.tasks.audit.request import AuditRequest, ModelSettings
from visaudit.tasks.audit.setup_checks import run_setup_checks, stop_if_wrong
from visaudit.tasks.audit.setup_report import SetupReport
from visaudit.tasks.audit.shard import ShardSettings
from visaudit.tasks.data.files import write_atomically
from visaudit.tasks.data.images import NORMALISATIONS, Preprocess
from visaudit.tasks.data.sources import (
    DataSourceError,
    build_index,
    class_names_from_index,
    read_class_file,
    write_index,
)
from visaudit.tasks.explain.catalogue import check_method_names
from visaudit.tasks.explain.impression_settings import choose_classes
from visaudit.tasks.explain.registry import check_methods
from visaudit.tasks.model.errors import ModelError
from visaudit.tasks.model.layers import stage_layers
from visaudit.tasks.model.loading import LoadedModel, default_preprocess, load_model

PLAN_NAME = "plan.json"
INDEX_NAME = "index.parquet"


class Shard(NamedTuple):
    """Rows ``start:stop`` of the run's index, audited as one Prefect task named ``name``."""

    name: str
    start: int
    stop: int


class RunPlan(BaseModel):
    """The validated plan of a run, saved beside its staged parts so a restart reuses it."""

    run_id: str
    out_dir: str
    request: AuditRequest
    classes: list[str]
    preprocess: Preprocess
    multi_label: bool
    layers: list[str]  # hooked layers, shallow to deep; the explained layer last (none: a TorchScript model)
    layer_reason: str = ""  # why the explained layer was chosen
    skipped: dict[str, str] = {}  # requested methods that cannot apply to the model -> the one-line note
    model_fingerprint: str
    data_fingerprint: str
    images: int
    shards: list[Shard]
    started: str
    setup: SetupReport | None = None  # the setup checks' numbers (None with --no-setup-checks)

    @property
    def folder(self) -> Path:
        return plan_dir(Path(self.out_dir), self.run_id)

    @property
    def layer(self) -> str:
        """The explained layer; "" when there is none (a TorchScript model)."""
        return self.layers[-1] if self.layers else ""

    def load_model(self, device: str | None = None) -> LoadedModel:
        """The run's model (cached per process), on ``device`` or the requested one."""
        model = self.request.model
        return load_model(model.spec(), device or model.device, model.input_size)

    def shard_settings(self) -> ShardSettings:
        request = self.request
        return ShardSettings(
            classes=tuple(self.classes),
            preprocess=self.preprocess,
            multi_label=self.multi_label,
            batch_size=request.compute.batch_size,
            decode_workers=request.compute.decode_workers,
            methods=tuple(request.explain.methods),
            layer=self.layer,
            stages=tuple(self.layers[:-1]),
            targets=tuple(request.explain.targets),
            target_classes=tuple(request.explain.target_classes),
            wsl_fraction=request.explain.wsl_threshold,
            occlusion=request.occlusion.spec() if "occlusion" in request.explain.methods else None,
            mil=request.mil.spec() if "mil_patches" in request.explain.methods else None,
            precision=request.compute.precision,
            gpu_decode=request.compute.gpu_decode,
            reads=request.data.read_policy(request.source),
        )

    def save(self) -> None:
        write_atomically(self.folder / PLAN_NAME, lambda tmp: tmp.write_text(self.model_dump_json(indent=2)))


def new_run_id() -> str:
    """Sortable, never all digits (so Hive partitioning reads it as a string)."""
    return f"r{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def plan_dir(out_dir: Path, run_id: str) -> Path:
    """Hidden folder holding a run's plan and index until the run is committed."""
    return Path(out_dir) / "runs" / f".staging-{run_id}"


_LOADED: dict[Path, tuple[tuple[int, int], RunPlan]] = {}  # plan file -> (its mtime and size, the plan)


def load_plan(folder: Path) -> RunPlan:
    """The plan saved in ``folder``, parsed once per process while the file is unchanged: every
    shard task loads it, and a million-image run has thousands of shards (treat it as read-only)."""
    path = (Path(folder) / PLAN_NAME).resolve()
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _LOADED.get(path)
    if cached is None or cached[0] != stamp:
        _LOADED.clear()  # one run's plan at a time per process
        cached = _LOADED[path] = (stamp, RunPlan.model_validate_json(path.read_text()))
    return cached[1]


def prepare_run(request: AuditRequest) -> RunPlan:
    """Validate the request, index the data, load the model once, and save the plan.

    Raises :class:`DataSourceError` or :class:`ModelError` with a one-line message for bad
    input. A plan saved by an earlier attempt of the same run is reused as is.
    """
    run_id = request.run_id or new_run_id()
    folder = plan_dir(Path(request.out_dir), run_id)
    if (folder / PLAN_NAME).exists():
        return load_plan(folder)
    check_method_names(request.explain.methods)
    index = build_index(request.source, allow_outside=request.data.allow_outside_paths, limits=request.data.limits())
    loaded = load_model(request.model.spec(), request.model.device, request.model.input_size)
    preprocess = _scaled(default_preprocess(loaded, request.model.resize, request.model.crop), request.model)
    classes = _class_names(request, loaded, index)
    if unknown_targets := [c for c in request.explain.target_classes if c not in classes]:
        raise ValueError(f"--target-class {unknown_targets}: not among the model's classes ({', '.join(classes[:8])}, ...)")
    layers = _explained_layers(loaded, request.explain.layer_by_layer)
    skipped = _check_methods(request, loaded, layers, preprocess.crop, classes)
    for name, note in skipped.items():
        logging.getLogger("visaudit").warning("method %s skipped: %s", name, note)
    applying = [m for m in request.explain.methods if m not in skipped]
    multi_label = request.model.multi_label
    if multi_label is None:
        multi_label = bool((index["labels"].map(len) > 1).any())
    setup = None
    if request.setup.enabled:
        setup = run_setup_checks(loaded, index, classes, preprocess, multi_label, request.compute.batch_size,
                                 request.setup.thresholds(), request.data.read_policy(request.source))
        if setup is not None:
            stop_if_wrong(setup)  # SetupError: one line naming the flags that fix a clearly wrong setup
    size = request.compute.shard_size
    plan = RunPlan(
        run_id=run_id,
        out_dir=str(Path(request.out_dir).resolve()),
        request=request.model_copy(update={"run_id": run_id,
                                           "explain": request.explain.model_copy(update={"methods": applying})}),
        classes=list(classes),
        preprocess=preprocess,
        multi_label=multi_label,
        layers=layers,
        layer_reason=loaded.layer_reason,
        skipped=skipped,
        model_fingerprint=loaded.fingerprint,
        data_fingerprint=_fingerprint(index),
        images=len(index),
        shards=[Shard(f"{i // size:05d}", i, min(i + size, len(index))) for i in range(0, len(index), size)],
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        setup=setup,
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_index(index, folder / INDEX_NAME)
    plan.save()
    return plan


def _scaled(preprocess: Preprocess, model: ModelSettings) -> Preprocess:
    """The preprocessing with ``--normalise`` and ``--channels`` applied."""
    if model.normalise is not None:
        mean, std = NORMALISATIONS[model.normalise]
        preprocess = dataclasses.replace(preprocess, mean=mean, std=std)
    return dataclasses.replace(preprocess, channels=model.channels)


def _class_names(request: AuditRequest, loaded: LoadedModel, index: pd.DataFrame) -> list[str]:
    """The model's class names: the user's file, else the weights', else the data's labels."""
    if request.model.classes_file:
        classes = read_class_file(Path(request.model.classes_file))
    elif loaded.categories:
        classes = loaded.categories
    else:
        classes = class_names_from_index(index)
    _check_labels_match(index, classes)
    if len(classes) != loaded.num_classes:
        raise ModelError(
            f"the model has {loaded.num_classes} outputs but {len(classes)} class names were found "
            f"({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}); pass --classes FILE "
            "with the model's class names, one per line, in output order"
        )
    return list(classes)


def _check_labels_match(index: pd.DataFrame, classes: list[str]) -> None:
    """Stop when the data has labels and not one of them is a class name: no image could be
    judged (numeric labels 0, 1, 2 with a names file are the usual cause)."""
    labels = class_names_from_index(index)
    if labels and not set(labels) & set(classes):
        numeric = all(label.lstrip("-").isdigit() for label in labels)
        hint = ("the labels look like class indices: write the class names in the manifest's label column "
                "(line i of the classes file is output i)" if numeric else
                "check the spelling and case, or pass --classes with the names the labels use")
        raise DataSourceError(f"{index.attrs.get('source', 'the data source')}: no label matches a class name "
                              f"(labels {', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''}; classes "
                              f"{', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); {hint}")


def _explained_layers(loaded: LoadedModel, layer_by_layer: bool) -> list[str]:
    """The hooked layers, shallow to deep: one stage per resolution (layer-by-layer), then the
    explained layer, which stands for its own resolution; none for a model without a layer."""
    if not loaded.layers:
        return []
    layer = loaded.layers[-1]
    if not layer_by_layer:
        return [layer]
    shapes = loaded.layer_shapes
    stages = stage_layers(shapes, loaded.model, layer=layer)
    if layer in stages:  # one stage per resolution, or per block on a transformer: those before the explained one
        return [s for s in stages if s != layer] + [layer]
    return [s for s in stages if shapes[s] != shapes.get(layer)] + [layer]


def _check_methods(request: AuditRequest, loaded: LoadedModel, layers: list[str], size: int,
                   classes: list[str]) -> dict[str, str]:
    """Fail now, with the fix, for settings a method cannot run with; return the methods that
    cannot apply to this model, with their notes (skipped; an error only when none applies)."""
    methods = request.explain.methods
    skipped = check_methods(loaded, methods, layers, size)
    if "occlusion" in methods:
        request.occlusion.spec().geometry(size)  # a window that does not fit fails here
    if "impressions" in methods:
        choose_classes(classes, request.impressions.classes, request.impressions.max_classes)  # unknown names
        request.impressions.settings(size)  # and bad options fail here
    return skipped


FINGERPRINT_ROWS = 65_536  # index rows hashed at a time: a whole million-image index's label strings held ~250 MB


def _fingerprint(index: pd.DataFrame) -> str:
    """The data's fingerprint: its image URIs and labels, in order (SHA-256 of every row's
    ``hash_pandas_object``, a row's hash not depending on the others: chunks hash the same)."""
    digest = hashlib.sha256()
    for start in range(0, len(index), FINGERPRINT_ROWS):
        part = index.iloc[start : start + FINGERPRINT_ROWS]
        rows = part[["uri"]].assign(labels=part["labels"].map(";".join))
        digest.update(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    return digest.hexdigest()

