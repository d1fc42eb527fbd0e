"""The end of a run: its record written, its staged tables and figures moved into place at once.

Until :func:`commit` renames the staging folders, readers see nothing of the run; after it,
they see all of it.
"""

from __future__ import annotations

import json
import os
import platform
import posixpath
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import torch

from visaudit.tasks.audit.plan import RunPlan
from visaudit.tasks.audit.record import DataInfo, ModelInfo, RunRecord
from visaudit.tasks.audit.setup_report import NearChance, near_chance
from visaudit.tasks.audit.steps import IMPRESSIONS_DIR
from visaudit.tasks.data import storage
from visaudit.tasks.data.records import MetricRow, metric_frame
from visaudit.tasks.explain.adversarial_output import ADVERSARIAL_DIR
from visaudit.tasks.explain.feature_index import FEATURES_DIR
from visaudit.tasks.findings.metrics import RunMetrics, judged_rows, summary_metrics

RUN_METRICS = ("images", "audited", "unreadable", "accuracy", "top5_accuracy", "ece")  # per-run trend rows
RECORD_COLUMNS = ["error", "correct", "labels", "top_classes", "confidence"]  # what the record's numbers read


def series_key(model_fingerprint: str, source: str, name: str | None = None) -> str:
    """Which runs form one trend: ``--series NAME`` when given, else the same model weights on
    the same data source, written canonically (a resolved path, or a URL with its scheme and
    host in lower case and its path normalised), so ``data/`` and ``/abs/data`` are one series."""
    if name:
        return json.dumps({"series": name})
    return json.dumps({"model": model_fingerprint, "source": canonical_source(source)}, sort_keys=True)


def canonical_source(source: str) -> str:
    """A data source written one way: an absolute resolved path, or a normalised URL."""
    parts = urlsplit(source)
    if parts.scheme and parts.netloc:
        path = posixpath.normpath(parts.path) if parts.path else ""
        return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))
    return str(Path(source).expanduser().resolve())


def run_metric_rows(metrics: RunMetrics, findings: pd.DataFrame, series: str) -> list[MetricRow]:
    """The run's headline numbers as ``metrics`` rows (``detail`` = the series key, so that
    nightly runs of one model on one source line up as a trend)."""
    counts = findings["severity"].value_counts()
    values: dict[str, float | None] = {name: getattr(metrics, name) for name in RUN_METRICS}
    values |= {f"findings_{level}": int(counts.get(level, 0)) for level in ("high", "medium", "low")}
    return [MetricRow(metric=name, detail=series, value=value, images=metrics.audited) for name, value in values.items()]


def build_record(plan: RunPlan, predictions: pd.DataFrame, timings: dict[str, float],
                 resumed_shards: int = 0) -> RunRecord:
    """The record of a finished run (its metrics computed from its predictions)."""
    import prefect

    request = plan.request
    parameters: dict[str, Any] = {
        "methods": request.explain.methods,
        "device": request.model.device,
        "batch_size": request.compute.batch_size,
        "shard_size": request.compute.shard_size,
        "thresholds": request.finding_thresholds().as_dict(),
        "setup_checks": request.setup.enabled,
    }
    if "mil_patches" in request.explain.methods:
        geometry = request.mil.spec().geometry(plan.preprocess.crop)
        parameters["mil_patches"] = {"patch": request.mil.patch, "stride": request.mil.stride,
                                     "patch_px": geometry.patch[0], "stride_px": geometry.stride[0],
                                     "patches_per_image": geometry.count}
    if request.adversarial.images:  # steps.adversarial skips these models: said here
        skipped = "multi-label model" if plan.multi_label else None if plan.layer else "no layer to explain"
        parameters["adversarial"] = {**request.adversarial.model_dump(), **({"skipped": skipped} if skipped else {})}
    if "impressions" in request.explain.methods:
        chosen = request.impressions.classes or f"up to {request.impressions.max_classes}"
        parameters["impressions"] = {"classes": chosen, **request.impressions.settings(plan.preprocess.crop).as_dict()}
    metrics = summary_metrics(predictions, plan.multi_label)
    return RunRecord(
        run_id=plan.run_id,
        started=plan.started,
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(name=request.model.arch or request.model.model, weights=request.model.weights,
                        fingerprint=plan.model_fingerprint, task="multilabel" if plan.multi_label else "multiclass",
                        layers=plan.layers, layer_reason=plan.layer_reason, num_classes=len(plan.classes),
                        skipped=plan.skipped),
        data=DataInfo(source=request.source, fingerprint=plan.data_fingerprint, images=plan.images,
                      unreadable=metrics.unreadable),
        classes=plan.classes,
        preprocess=asdict(plan.preprocess),
        parameters=parameters,
        versions={"visaudit": _version("visaudit"), "torch": torch.__version__, "torchvision": _version("torchvision"),
                  "prefect": prefect.__version__, "python": platform.python_version()},
        timings=timings,
        resumed_shards=resumed_shards,
        metrics=metrics,
        setup=plan.setup,
        near_chance=audit_near_chance(predictions, plan.multi_label, request.setup.confidence),
        figures={folder: sum(1 for p in (plan.folder / folder).rglob("*") if p.is_file())
                 for folder in (FEATURES_DIR, IMPRESSIONS_DIR, ADVERSARIAL_DIR) if (plan.folder / folder).is_dir()},
    )


def audit_near_chance(predictions: pd.DataFrame, multi_label: bool, confidence: float) -> NearChance:
    """The whole audit's accuracy (exact match for multi-label) against chance, the share of
    the most common label (label set)."""
    judged = judged_rows(predictions)
    keys = [";".join(sorted(str(v) for v in labels)) for labels in judged["labels"]]
    return near_chance(judged["correct"].astype(bool).to_numpy(), keys, confidence,
                       "exact_match" if multi_label else "accuracy")


def commit(plan: RunPlan, timings: dict[str, float], resumed_shards: int = 0) -> Path:
    """Make the run visible: write run.json, move staged tables and figures into place (the tables'
    parts merged: ``storage.commit_run``), drop the plan. ``resumed_shards``: how many shards an
    earlier attempt of the run had finished (``run.json``'s ``resumed_shards``)."""
    out_dir = Path(plan.out_dir)
    predictions = storage.read_staged("predictions", out_dir, plan.run_id, columns=RECORD_COLUMNS)
    run_dir = out_dir / "runs" / plan.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    record = build_record(plan, predictions, timings, resumed_shards)
    for folder in (FEATURES_DIR, IMPRESSIONS_DIR, ADVERSARIAL_DIR):  # figures made at audit time (they need the model)
        staged = plan.folder / folder
        if staged.is_dir():
            shutil.rmtree(run_dir / folder, ignore_errors=True)
            os.replace(staged, run_dir / folder)
    findings = storage.read_staged("findings", out_dir, plan.run_id)
    series = series_key(plan.model_fingerprint, plan.request.source, plan.request.series)
    assert record.metrics is not None
    storage.write_part(metric_frame(run_metric_rows(record.metrics, findings, series)), "metrics", out_dir,
                       plan.run_id, "run")
    record.save(run_dir)
    storage.commit_run(out_dir, plan.run_id)
    shutil.rmtree(plan.folder, ignore_errors=True)
    return run_dir


def _version(package: str) -> str:
    """The installed version of ``package``, read from its metadata (importing torchvision for its
    ``__version__`` costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "0+unknown"
