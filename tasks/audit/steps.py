"""The steps of a run after planning, each a plain function of the plan (the flow wraps each
in a Prefect task): audit a shard, the sanity check, deletion/insertion, class impressions,
the adversarial experiment, findings, feature views. Each reads what earlier steps staged and stages its own rows.

Every step loads the model through the per-process cache (:meth:`RunPlan.load_model`), so
tasks pass only the plan and names, never models or tensors.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from visaudit.tasks.audit.plan import INDEX_NAME, RunPlan, load_plan
from visaudit.tasks.audit.progress import mark_images
from visaudit.tasks.audit.shard import ShardResult, audit_shard
from visaudit.tasks.data import storage
from visaudit.tasks.data.batches import normalise, standardise, to_batch
from visaudit.tasks.data.columns import image_positions, rows_where
from visaudit.tasks.data.images import Decoded, boxes_to_input, decode_many
from visaudit.tasks.data.memory import release_freed, system_arrow_pool
from visaudit.tasks.data.records import MetricRow, metric_frame
from visaudit.tasks.data.schema import table_schema
from visaudit.tasks.data.sources import read_index
from visaudit.tasks.explain import cam, mil, occlusion, rise
from visaudit.tasks.explain.adversarial import attack_and_explain
from visaudit.tasks.explain.adversarial_output import ADVERSARIAL_DIR, adversarial_table, save_strip_pngs
from visaudit.tasks.explain.catalogue import ATTENTION_METHODS, GUIDED_METHODS
from visaudit.tasks.explain.colour_impressions import colour_impressions
from visaudit.tasks.explain.feature_index import FEATURES_DIR
from visaudit.tasks.explain.features import write_feature_views
from visaudit.tasks.explain.impression_output import impression_cam, impression_table, save_pngs
from visaudit.tasks.explain.impression_settings import choose_classes
from visaudit.tasks.explain.impressions import class_impressions
from visaudit.tasks.explain.registry import GRADIENT_METHODS
from visaudit.tasks.explain.sanity import sanity_check
from visaudit.tasks.findings.compute import compute_findings
from visaudit.tasks.findings.cue_probe import cue_metric_rows, cue_samples, probe_cues
from visaudit.tasks.findings.fixed_location import location_candidates, location_metric_rows, probe_location
from visaudit.tasks.findings.inputs import FindingInputs, embedding_rows
from visaudit.tasks.findings.localisation_rates import localisation_metric_rows
from visaudit.tasks.findings.probe_records import CueProbe, LocationCandidate, LocationProbe
from visaudit.tasks.findings.thresholds import Thresholds
from visaudit.tasks.model.channels import rgb_view
from visaudit.tasks.model.head import Head
from visaudit.tasks.model.hooks import hooked_forward
from visaudit.tasks.model.layers import sanity_stages
from visaudit.tasks.model.loading import LoadedModel

IMPRESSIONS_DIR = "impressions"  # figures made at audit time (they need the model), moved into the run at commit
FEATURE_IMAGES = 4
# The columns of the staged tables that the detectors (tasks/findings/), their probes and the localisation
# rates read, the others left on disk (at a million images the maps, top scores and map geometry held
# 0.7 GB); a table not named is read whole. The top-5 pointing game reads the heatmaps itself, if at all.
FIND_COLUMNS: dict[str, list[str]] = {
    "predictions": ["image_id", "labels", "predicted", "top_classes", "confidence", "correct", "image_width",
                    "image_height", "box_x0", "attributes", "error"],
    "explanations": ["image_id", "method", "layer", "target", "is_label", "peak_x", "peak_y", "energy_in_box",
                     "box_area_fraction", "pointing_hit", "wsl_iou", "localised"],
    "occlusion": ["image_id", "target", "is_label", "gradcam_spearman"],
    # every column but the embeddings (512 bytes an image): read for the few images compared (``embeddings``);
    # ``predictions.uri`` likewise, for the few images a probe loads (``_staged_uris``)
    "signals": [name for name in table_schema("signals").names if name != "embedding"],
}


def run_shard(plan_folder: str, shard: str, start: int, stop: int) -> ShardResult:
    """Audit one shard of the planned run (the model comes from the per-process cache)."""
    plan = load_plan(Path(plan_folder))
    loaded = plan.load_model(worker_device(plan.request.model.device))
    rows = read_index(Path(plan_folder) / INDEX_NAME, start, stop)
    return audit_shard(rows, loaded, plan.shard_settings(), Path(plan.out_dir), plan.run_id, shard,
                       lambda done: mark_images(Path(plan_folder), shard, done))


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


def load_inputs(plan: RunPlan, loaded: LoadedModel, uris: list[str]) -> torch.Tensor:
    """The readable images among ``uris``, preprocessed, as one batch on the device."""
    pre = plan.preprocess
    workers = plan.request.compute.decode_workers
    reads = plan.request.data.read_policy(plan.request.source)
    decoded = [d for d in decode_many(uris, pre, workers, policy=reads) if isinstance(d, Decoded)]
    if not decoded:
        return torch.zeros(0, 3, pre.crop, pre.crop, device=loaded.device)
    return normalise(to_batch(decoded, loaded.device), pre)


def sample_inputs(plan: RunPlan, loaded: LoadedModel, count: int) -> torch.Tensor:
    """The first ``count`` readable images of the run, preprocessed, as one batch on the device
    (the index is read ``count`` rows at a time, only as far as needed)."""
    batches = []
    found = 0
    for start in itertools.count(0, count):
        rows = read_index(plan.folder / INDEX_NAME, start, start + count)
        batches.append(load_inputs(plan, loaded, rows["uri"].tolist()))
        found += len(batches[-1])
        if found >= count or len(rows) < count:
            break
    return torch.cat(batches)[:count]


def sanity(plan: RunPlan) -> int:
    """Model-randomisation sanity check of the run's methods; staged as ``metrics`` rows."""
    request = plan.request
    methods = tuple(m for m in request.explain.methods if m in GRADIENT_METHODS or m in GUIDED_METHODS + ATTENTION_METHODS)
    if not request.sanity.enabled or not methods:
        return 0
    loaded = plan.load_model()
    inputs = sample_inputs(plan, loaded, request.sanity.images)
    if inputs.shape[0] < 2:
        return 0
    stages = sanity_stages(loaded.layer_shapes, loaded.model, plan.layer)
    result = sanity_check(loaded.model, inputs, plan.layer, stages, methods)
    rows = [MetricRow(metric="sanity_spearman", method=row.method, layer=row.layer, detail=f"{row.step}:{row.randomised}",
                      value=row.spearman_mean, images=int(row.images)) for row in result.itertuples()]
    storage.write_part(metric_frame(rows), "metrics", Path(plan.out_dir), plan.run_id, "sanity")
    return len(rows)


def deletion_insertion(plan: RunPlan) -> int:
    """RISE deletion and insertion AUC of Grad-CAM, and of occlusion and mil_patches when they
    are methods, for the predicted class, on the first ``rise_images`` readable images; staged
    as ``metrics`` rows (mean per method)."""
    request = plan.request
    methods = request.explain.methods
    if not {"occlusion", "mil_patches"} & set(methods) or request.occlusion.rise_images < 1:
        return 0
    loaded = plan.load_model()
    inputs = sample_inputs(plan, loaded, request.occlusion.rise_images)
    if inputs.shape[0] == 0:
        return 0
    head = Head(plan.multi_label)
    forward = hooked_forward(loaded.model, inputs, plan.layers[-1:])  # no layer (TorchScript): the scores only
    target = forward.scores.detach().argmax(dim=1)
    sample = torch.arange(inputs.shape[0], device=inputs.device)
    saliency = {"gradcam": cam.grad_cam(forward, sample, target)[plan.layer].detach()} if plan.layer else {}
    if "occlusion" in methods:
        muted = occlusion.occlusion_maps(loaded.model, inputs, request.occlusion.spec(), head=head)
        saliency["occlusion"] = muted.maps(sample, target).clamp(min=0)
    if "mil_patches" in methods:
        patches = mil.mil_maps(loaded.model, inputs, request.mil.spec(), head=head)
        saliency["mil_patches"] = mil.to_pixels(patches.maps(sample, target), patches.geometry)
    rows = []
    for method, maps in saliency.items():
        scores = rise.deletion_insertion(loaded.model, inputs, maps, target, head=head)
        for metric, values in (("deletion_auc", scores.deletion_auc), ("insertion_auc", scores.insertion_auc)):
            rows.append(MetricRow(metric=metric, method=method, layer=plan.layer if method == "gradcam" else "input",
                                  detail="predicted class", value=float(values.mean()), images=int(values.numel())))
    storage.write_part(metric_frame(rows), "metrics", Path(plan.out_dir), plan.run_id, "rise")
    return len(rows)


def impressions(plan: RunPlan) -> int:
    """Class impressions (one batch over the chosen classes) with their Grad-CAM and colour
    impressions; PNGs beside the plan, rows staged as ``impressions``. Returns how many."""
    request = plan.request
    if "impressions" not in request.explain.methods:
        return 0
    index = read_index(plan.folder / INDEX_NAME)
    counts = index["labels"].explode().value_counts().to_dict()
    classes = choose_classes(plan.classes, request.impressions.classes, request.impressions.max_classes, counts)
    pre = plan.preprocess
    loaded = plan.load_model()
    options = request.impressions.settings(pre.crop)
    model, mean, std = rgb_view(loaded.model, pre.mean, pre.std, pre.channels)  # impressions are RGB images
    result = class_impressions(model, classes, options, mean, std, loaded.device, multi_label=plan.multi_label)
    colours = colour_impressions(model, classes, options, mean, std, loaded.device,
                                 multi_label=plan.multi_label) if options.colour_levels else None
    located = (impression_cam(loaded.model, normalise(result.images.to(loaded.device), pre), classes, plan.layer)
               if plan.layer else None)  # no layer (TorchScript): the impressions without their Grad-CAM
    paths = save_pngs(result, plan.classes, plan.folder / IMPRESSIONS_DIR)
    table = impression_table(result, located, plan.classes, [f"{IMPRESSIONS_DIR}/{path.name}" for path in paths],
                             colours)
    storage.write_part(table, "impressions", Path(plan.out_dir), plan.run_id, "00000")
    return len(table)


def attack_sample(predictions: pd.DataFrame, count: int) -> pd.DataFrame:
    """Up to ``count`` readable images the model gets right (or unlabelled ones), taken in turn
    from each predicted class (the first of each class, then the second, ...), in table order."""
    rows = predictions[predictions["error"].isna() & ~predictions["correct"].eq(False).fillna(False)]
    rows = rows.assign(_top=rows["top_classes"].map(lambda top: top[0]))
    turn = rows.groupby("_top", sort=False).cumcount()
    return rows.assign(_turn=turn).sort_values(["_turn", "_top"], kind="stable").head(count)


def adversarial(plan: RunPlan) -> int:
    """PGD at every budget on a sample (``--adversarial-images``), Grad-CAM of the original and
    the adversarial class (``explain.adversarial``); rows staged as ``adversarial``, the strip
    PNGs beside the plan. Multi-class runs only. Returns how many rows."""
    settings = plan.request.adversarial
    if settings.images < 1 or plan.multi_label or not plan.layer:
        return 0
    predictions = storage.read_staged("predictions", Path(plan.out_dir), plan.run_id)
    sample = attack_sample(predictions, settings.images)
    reads = plan.request.data.read_policy(plan.request.source)
    decoded = decode_many(sample["uri"].tolist(), plan.preprocess, plan.request.compute.decode_workers, policy=reads)
    readable = [isinstance(d, Decoded) for d in decoded]
    sample, decoded = sample[readable], [d for d in decoded if isinstance(d, Decoded)]
    if not decoded:
        return 0
    loaded = plan.load_model()
    pixels = to_batch(decoded, loaded.device).float() / 255
    boxes = torch.from_numpy(boxes_to_input(sample[["box_x0", "box_y0", "box_x1", "box_y1"]].to_numpy(float), decoded))
    attack = settings.attack()
    result = attack_and_explain(loaded.model, pixels, boxes, plan.layer, attack,
                                lambda x: standardise(x, plan.preprocess), plan.request.compute.batch_size)
    ids = sample["image_id"].tolist()
    paths = save_strip_pngs(result, pixels, ids, plan.folder / ADVERSARIAL_DIR)
    confidence = sample["confidence"].to_numpy(float)
    table = adversarial_table(result, ids, plan.classes, confidence, attack, plan.layer, paths)
    storage.write_part(table, "adversarial", Path(plan.out_dir), plan.run_id, "00000")
    return len(table)


def _staged_embeddings(plan: RunPlan, image_ids: Sequence[str]) -> np.ndarray:
    """The staged ``signals.embedding`` vectors of ``image_ids``, in that order (only their rows read)."""
    rows = storage.read_staged("signals", Path(plan.out_dir), plan.run_id, columns=["image_id", "embedding"],
                               nested_as_arrow=True, image_ids=image_ids)
    return embedding_rows(rows, image_ids)


def _staged_uris(plan: RunPlan) -> Callable[[Sequence[str]], list[str]]:
    """The ``uri`` of staged images by image id (KeyError for an id not staged): read for the
    probes alone, which load a few images of every class (the detectors never read it: 86 MB at
    a million images). Looked up by Arrow's hash, not a pandas index (another ~110 MB)."""
    rows = storage.read_staged("predictions", Path(plan.out_dir), plan.run_id, columns=["image_id", "uri"])

    def uris_of(image_ids: Sequence[str]) -> list[str]:
        at = image_positions(pd.Series(list(image_ids), dtype=object), rows["image_id"])
        if (missing := [i for i, p in zip(image_ids, at) if p < 0]):
            raise KeyError(f"images not staged in run {plan.run_id}: {missing[:5]}")
        return rows["uri"].iloc[at].tolist()

    return uris_of


def _model_probes(plan: RunPlan, audited: pd.DataFrame, explanations: pd.DataFrame,
                  thresholds: Thresholds) -> tuple[list[LocationCandidate], dict[str, LocationProbe], dict[str, CueProbe]]:
    """The findings' model probes: each fixed-location candidate's spot muted on sample images of its
    class, and each class's recurring patch pasted and removed. The images they load are found by
    uri here, so that the detectors never hold that column."""
    candidates = location_candidates(audited, rows_where(explanations, explanations["layer"] == plan.layer), thresholds)
    samples = cue_samples(audited, thresholds)
    if not candidates and not samples:
        return candidates, {}, {}
    uris, loaded = _staged_uris(plan), plan.load_model()

    def load(image_ids: Sequence[str]) -> torch.Tensor:
        return load_inputs(plan, loaded, uris(image_ids))

    probes = {}
    for candidate in candidates:
        inputs = load(candidate.sample_ids)
        if len(inputs) >= 2:
            probes[candidate.class_name] = probe_location(
                loaded.model, inputs, plan.classes.index(candidate.class_name),
                candidate.x, candidate.y, plan.multi_label, thresholds.fixed_location_patch_ratio,
            )
    cues = probe_cues(loaded.model, samples, load, audited, plan.classes, thresholds, plan.multi_label) if samples else {}
    return candidates, probes, cues


def find(plan: RunPlan) -> int:
    """Compute findings over the run's staged tables and stage them; returns how many.

    The fixed-location and shortcut-cue detectors also need the model: their candidate spots
    are probed by muting them on sample images of the class (``findings.fixed_location``),
    recurring near-identical patches by pasting and removing them (``findings.cue_probe``).
    Arrow allocates from ``malloc`` meanwhile (``system_arrow_pool``), which hands its pages back.
    """
    with system_arrow_pool():
        out_dir = Path(plan.out_dir)
        staged = {table: storage.read_staged(table, out_dir, plan.run_id, columns=FIND_COLUMNS.get(table),
                                             nested_as_arrow=table == "signals")  # vectors as Arrow: no object per cell
                  for table in ("predictions", "explanations", "signals", "occlusion", "metrics", "impressions", "adversarial")}
        thresholds = plan.request.finding_thresholds()
        predictions, explanations = staged["predictions"], staged["explanations"]
        audited = rows_where(predictions, predictions["error"].isna())
        candidates, probes, cues = _model_probes(plan, audited, explanations, thresholds)
        release_freed()  # the probes' images and search arrays
        findings = compute_findings(FindingInputs(
            predictions=predictions, explanations=explanations, classes=plan.classes, multi_label=plan.multi_label,
            layer=plan.layer, signals=staged["signals"], occlusion=staged["occlusion"], metrics=staged["metrics"],
            impressions=staged["impressions"], locations=(candidates, probes), cues=cues,
            adversarial=staged["adversarial"], embeddings=functools.partial(_staged_embeddings, plan),
        ), thresholds)
        if probes:  # every probed candidate's numbers, flagged or not, for the record
            rows = metric_frame(location_metric_rows(candidates, probes, plan.layer))
            storage.write_part(rows, "metrics", out_dir, plan.run_id, "locations")
        if cues:
            storage.write_part(metric_frame(cue_metric_rows(cues, plan.layer)), "metrics", out_dir, plan.run_id, "cues")

        def heatmaps() -> pd.Series:  # read only for a top-5 pointing game the maps can give
            return storage.read_staged("explanations", out_dir, plan.run_id, columns=["heatmap"])["heatmap"]

        if located := localisation_metric_rows(predictions, explanations, plan.multi_label, heatmaps):  # pointing game, WSL
            storage.write_part(metric_frame(located), "metrics", out_dir, plan.run_id, "localisation")
        storage.write_part(findings, "findings", out_dir, plan.run_id, "00000")
        return len(findings)


def feature_views(plan: RunPlan) -> int:
    """First-layer filters and the most active channels of a few shown images (finding
    evidence first, then the most confident failures), written beside the plan."""
    out_dir = Path(plan.out_dir)
    findings = storage.read_staged("findings", out_dir, plan.run_id, columns=["evidence"])
    predictions = storage.read_staged("predictions", out_dir, plan.run_id,
                                      columns=["image_id", "uri", "correct", "confidence", "error"])
    readable = predictions[predictions["error"].isna()]
    failures = readable[readable["correct"].eq(False).fillna(False).astype(bool)].sort_values(
        "confidence", ascending=False, kind="stable"
    )
    evidence = [ids[0] for ids in findings["evidence"] if ids is not None and len(ids)]
    chosen: list[str] = []  # the first distinct ones, reading no further
    for image_id in itertools.chain(evidence, failures["image_id"], readable["image_id"]):
        if len(chosen) == FEATURE_IMAGES:
            break
        if image_id not in chosen:
            chosen.append(image_id)
    if not chosen or not plan.layer:  # no layer (TorchScript): no module to read filters or channels from
        return 0
    uris = readable.set_index("image_id").loc[chosen, "uri"].tolist()
    reads = plan.request.data.read_policy(plan.request.source)
    decoded = [d for d in decode_many(uris, plan.preprocess, policy=reads) if isinstance(d, Decoded)]
    if len(decoded) != len(chosen):
        return 0  # an image changed since its shard read it: skip the view rather than mislabel it
    loaded = plan.load_model()
    inputs = normalise(to_batch(decoded, loaded.device), plan.preprocess)
    index = write_feature_views(
        loaded.model, inputs, [d.pixels for d in decoded], chosen, plan.layer, plan.folder / FEATURES_DIR
    )
    return len(index["images"])
