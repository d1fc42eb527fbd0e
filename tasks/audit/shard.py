"""Audit one shard of images: decode, one forward, predictions, Grad-CAM, scores, Parquet parts.

Everything per batch is tensors on the device; the only per-image Python work is the
bookkeeping that turns results into table rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from visaudit.tasks.audit.shard_rows import BatchResult, BatchRows, batch_rows
from visaudit.tasks.data import storage
from visaudit.tasks.data.batches import normalise, to_batch
from visaudit.tasks.data.images import Decoded, Preprocess, boxes_to_input, decode_many
from visaudit.tasks.data.labels import label_matrix
from visaudit.tasks.data.reads import ReadPolicy
from visaudit.tasks.explain import cam, localisation, mil, occlusion, signals
from visaudit.tasks.explain.attention_maps import attention_maps
from visaudit.tasks.explain.cam_family import class_activation_maps, linear_head
from visaudit.tasks.explain.catalogue import ATTENTION_METHODS, GUIDED_METHODS, INPUT_LAYER
from visaudit.tasks.explain.guided import guided_saliency
from visaudit.tasks.explain.registry import GRADIENT_METHODS
from visaudit.tasks.model.attention import captured_attention
from visaudit.tasks.model.errors import ModelError
from visaudit.tasks.model.head import Head
from visaudit.tasks.model.hooks import HookedForward, hooked_forward
from visaudit.tasks.model.layout import token_grid
from visaudit.tasks.model.loading import LoadedModel

TOP_K = 5
NON_FINITE = "NonFiniteScores: the model's class scores for this image are NaN or infinite; no prediction"


@dataclass(frozen=True)
class ShardSettings:
    """What a shard needs besides its rows; plain values so it can cross process boundaries."""

    classes: tuple[str, ...]
    preprocess: Preprocess
    multi_label: bool = False
    batch_size: int = 32
    label_threshold: float = 0.5  # multi-label: sigmoid score at which a class is predicted
    decode_workers: int = 4
    methods: tuple[str, ...] = ("gradcam",)  # at the explained layer
    layer: str = ""  # the explained layer (the last conv stage unless named)
    stages: tuple[str, ...] = ()  # extra layers for the layer-by-layer view (Grad-CAM only)
    targets: tuple[str, ...] = ("predicted", "true")  # and/or "top<k>"
    target_classes: tuple[str, ...] = ()  # named classes explained for every image
    occlusion: occlusion.OcclusionSpec | None = None  # muting windows, when "occlusion" is a method
    mil: mil.MilSpec | None = None  # the patches, when "mil_patches" is a method
    wsl_fraction: float = localisation.WSL_FRACTION  # WSL: binarise each map at this fraction of its maximum
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; "fp32": fp32 everywhere
    gpu_decode: bool = True  # on CUDA, decode JPEG files with nvJPEG (PIL for everything else)
    reads: ReadPolicy = field(default_factory=ReadPolicy)  # where images may be read from, and how much

    @property
    def layers(self) -> list[str]:
        """Hooked layers, shallow to deep, the explained layer last; none without a layer (TorchScript)."""
        return [s for s in self.stages if s != self.layer] + ([self.layer] if self.layer else [])


@dataclass
class ShardResult:
    """What a finished shard reports back (small: counts and timings, never tensors)."""

    shard: str
    images: int
    unreadable: int
    seconds: dict[str, float] = field(default_factory=dict)
    reused: bool = False


def audit_shard(
    rows: pd.DataFrame,
    loaded: LoadedModel,
    settings: ShardSettings,
    out_dir: Path,
    run_id: str,
    shard: str,
    progress: Callable[[int], None] | None = None,
) -> ShardResult:
    """Audit ``rows`` of the index and write their predictions and explanations parts;
    ``progress`` is told the images finished after every batch.

    A shard whose parts exist already (a restarted run) is not recomputed.
    """
    if all(storage.part_exists(table, out_dir, run_id, shard) for table in ("predictions", "explanations", "signals")):
        if progress:
            progress(len(rows))
        return ShardResult(shard, len(rows), 0, reused=True)
    timings = {"decode": 0.0, "model": 0.0, "rows": 0.0}
    non_finite = 0
    built: list[Future[int]] = []
    batches = [rows.iloc[i : i + settings.batch_size] for i in range(0, len(rows), settings.batch_size)]
    parts = ShardParts(out_dir, run_id, shard)

    def load(batch: pd.DataFrame) -> list[Decoded | str]:
        device = loaded.device if settings.gpu_decode else None
        return decode_many(batch["uri"].tolist(), settings.preprocess, settings.decode_workers, device, settings.reads)

    def build(batch: pd.DataFrame, decoded: list[Decoded | str], ok: list[int], result: BatchResult | None) -> int:
        mark = time.perf_counter()
        built_rows = batch_rows(batch, decoded, ok, result, settings)
        parts.write(built_rows)
        timings["rows"] += time.perf_counter() - mark  # on the writer thread, off the model's path
        return int(built_rows.predictions["error"].notna().sum())

    # Decode the next batch while the model works on the current one, and turn the previous
    # batch's results into table rows, Arrow and Parquet row groups on a writer thread: the
    # model's loop only waits for them.
    try:
        with ThreadPoolExecutor(max_workers=1) as prefetch, ThreadPoolExecutor(max_workers=1) as writer:
            pending = prefetch.submit(load, batches[0]) if batches else None
            for number, batch in enumerate(batches):
                t0 = time.perf_counter()
                decoded = pending.result()  # type: ignore[union-attr]
                if number + 1 < len(batches):
                    pending = prefetch.submit(load, batches[number + 1])
                t1 = time.perf_counter()
                ok = [i for i, d in enumerate(decoded) if isinstance(d, Decoded)]
                result = _run_batch(batch.iloc[ok], [decoded[i] for i in ok], loaded, settings) if ok else None
                if result is not None and not result.finite.all():  # NaN/inf scores are no prediction
                    for i in np.array(ok)[~result.finite]:
                        decoded[i] = NON_FINITE
                    non_finite += int((~result.finite).sum())
                    ok = [i for i, d in enumerate(decoded) if isinstance(d, Decoded)]
                    result = _run_batch(batch.iloc[ok], [decoded[i] for i in ok], loaded, settings) if ok else None
                t2 = time.perf_counter()
                built.append(writer.submit(build, batch, decoded, ok, result))
                if failed := next((f for f in built if f.done() and f.exception() is not None), None):
                    failed.result()  # a failed row group (a full disk, say) ends the shard now, not after every batch
                timings["decode"] += t1 - t0  # time waiting for decoding, beyond what overlapped
                timings["model"] += t2 - t1
                if progress:
                    progress(min(len(rows), (number + 1) * settings.batch_size))
            waiting = time.perf_counter()
            unreadable = sum(future.result() for future in built)  # a row builder's failure is the shard's
            timings["rows_wait"] = time.perf_counter() - waiting  # rows still unbuilt when the model was done
        if non_finite and unreadable == len(rows):
            raise ModelError(f"the model returned NaN or infinite scores for every readable image of shard {shard} "
                             f"({non_finite} images); check the weights (a diverged training?) and the preprocessing")
        t3 = time.perf_counter()
        parts.close()
        timings["write"] = time.perf_counter() - t3
    except BaseException:
        parts.abort()
        raise
    return ShardResult(shard, len(rows), unreadable, timings)


class ShardParts:
    """The Parquet parts of one shard (``explanations``, ``signals``, ``occlusion`` when any,
    ``predictions``), streamed batch by batch through :class:`storage.PartWriter`. ``close``
    puts them in place with ``predictions`` last: its part marks the shard done."""

    def __init__(self, out_dir: Path, run_id: str, shard: str) -> None:
        self._where = (out_dir, run_id, shard)
        self._writers: dict[str, storage.PartWriter] = {}

    def _writer(self, table: str) -> storage.PartWriter:
        if table not in self._writers:
            out_dir, run_id, shard = self._where
            self._writers[table] = storage.PartWriter(table, out_dir, run_id, shard)
        return self._writers[table]

    def write(self, rows: BatchRows) -> None:
        for table in ("predictions", "explanations", "signals", "occlusion"):
            frame = getattr(rows, table)
            if frame is not None:
                self._writer(table).write(frame)

    def close(self) -> None:
        first = [self._writer(table) for table in ("explanations", "signals")]  # written even when empty
        if "occlusion" in self._writers:
            first.append(self._writers["occlusion"])
        with ThreadPoolExecutor(max_workers=len(first)) as closing:  # Arrow compresses and writes without the GIL
            for future in [closing.submit(writer.close) for writer in first]:
                future.result()
        self._writer("predictions").close()

    def abort(self) -> None:
        for writer in self._writers.values():  # each drops its file whatever happened to the others
            writer.abort()


def target_matrix(
    probs: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, settings: ShardSettings
) -> torch.Tensor:
    """(N, K) boolean: the classes to explain for each image (predicted, true, top-k, named)."""
    wanted = torch.zeros_like(predicted)
    for choice in settings.targets:
        if choice == "predicted":
            wanted |= predicted
        elif choice == "true":
            wanted |= labels
        elif choice.startswith("top") and choice[3:].isdigit():
            k = min(int(choice[3:]), probs.shape[1])
            wanted.scatter_(1, probs.topk(k, dim=1).indices, True)
        else:
            raise ValueError(f"unknown target {choice!r}; use predicted, true or top<k> (e.g. top3)")
    if settings.target_classes:
        named = [settings.classes.index(name) for name in settings.target_classes]
        wanted[:, named] = True
    return wanted


def _run_batch(
    rows: pd.DataFrame, decoded: list[Decoded], loaded: LoadedModel, settings: ShardSettings
) -> BatchResult:
    """One forward for predictions + activations; every requested map from shared gradients."""
    device = loaded.device
    pixels = to_batch(decoded, device)
    inputs = normalise(pixels, settings.preprocess)
    guided = tuple(m for m in settings.methods if m in GUIDED_METHODS)
    fast = device.type == "cuda" and settings.precision == "auto"
    if device.type == "cuda":
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    attention = tuple(m for m in settings.methods if m in ATTENTION_METHODS)
    capture = (captured_attention(loaded.model, gradients="gradient_rollout" in attention) if attention
               else nullcontext(None))
    with capture as captured, torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
        forward = hooked_forward(loaded.model, inputs, settings.layers, guided=bool(guided))
    scores = forward.scores.detach().float()
    labels = torch.from_numpy(label_matrix(rows["labels"].tolist(), settings.classes)).to(device)
    has_label = labels.any(dim=1)
    probs = Head(settings.multi_label).probabilities(scores)
    if settings.multi_label:
        predicted = probs >= settings.label_threshold
        loss = F.binary_cross_entropy_with_logits(scores, labels.float(), reduction="none").mean(dim=1)
        correct = (predicted == labels).all(dim=1).float()
    else:
        predicted = F.one_hot(probs.argmax(dim=1), probs.shape[1]).bool()
        single = labels.sum(dim=1) == 1
        target = labels.float().argmax(dim=1)
        loss = F.cross_entropy(scores, target, reduction="none")
        correct = (predicted & labels).any(dim=1).float()
        has_label = single
    nan = torch.full_like(loss, float("nan"))
    loss, correct = torch.where(has_label, loss, nan), torch.where(has_label, correct, nan)
    k = min(TOP_K, probs.shape[1])
    top_score, top_index = probs.topk(k, dim=1)

    pairs = target_matrix(probs, predicted, labels, settings).nonzero()  # sorted by image, then class
    sample, target_cls = pairs[:, 0], pairs[:, 1]
    gradient_methods = tuple(m for m in settings.methods if m in GRADIENT_METHODS)
    stage_methods = ("gradcam",) if settings.stages else ()
    needed = tuple(dict.fromkeys(gradient_methods + stage_methods + guided))
    if captured is not None:  # before the CAM family's last backward frees the graph
        grid = token_grid(loaded.model, (int(inputs.shape[-2]), int(inputs.shape[-1]))) or (0, 0)
        attended = attention_maps(captured, forward.scores, sample, target_cls, attention, grid)
    all_maps = cam.explain(forward, sample, target_cls, needed) if needed else {}
    maps = {
        (method, layer): m
        for (method, layer), m in all_maps.items()
        if layer == settings.layer and method in gradient_methods or layer != settings.layer and method == "gradcam"
    }
    for method in guided:
        maps[(method, INPUT_LAYER)] = guided_saliency(all_maps[(method, INPUT_LAYER)])
    if captured is not None:
        maps.update(attended)
    if "cam" in settings.methods:
        weights = linear_head(loaded.model, forward, settings.layer)
        if weights is None:
            raise ValueError(
                f"CAM does not apply: the model's head on {settings.layer!r} is not global-average-pool + "
                "linear; use gradcam (which equals CAM on such heads)"
            )
        maps[("cam", settings.layer)] = class_activation_maps(
            forward.activations[settings.layer], weights, sample, target_cls
        )
    if "mil_patches" in settings.methods:  # every class's patch scores from one set of forwards
        patches = mil.mil_maps(loaded.model, inputs, settings.mil or mil.MilSpec(), head=Head(settings.multi_label))
        maps[("mil_patches", INPUT_LAYER)] = mil.stored_maps(patches.maps(sample, target_cls), patches.geometry)
    boxes = _input_boxes(rows, decoded, device)[sample]
    crop = settings.preprocess.crop
    point = cam.pointing_tolerance(crop)
    map_scores = {k: cam.score_maps(m, boxes, crop, box_tolerance(crop, m.shape[-2]), point) for k, m in maps.items()}
    located = {k: localisation.localise(cam.upsample(m, crop), boxes, settings.wsl_fraction) for k, m in maps.items()}
    occluded = occlusion_scores = faithful = None
    if "occlusion" in settings.methods:
        spec = settings.occlusion or occlusion.OcclusionSpec()
        muted = occlusion.occlusion_maps(loaded.model, inputs, spec, head=Head(settings.multi_label))
        occluded = muted.maps(sample, target_cls)
        occlusion_scores = occlusion.box_scores(occluded, boxes, settings.preprocess.crop, spec)
        gradcam = all_maps.get(("gradcam", settings.layer))
        if gradcam is not None:
            faithful = occlusion.faithfulness(gradcam.detach(), occluded).float().cpu().numpy()
        occluded = occluded.float().cpu().numpy()
    return BatchResult(
        probs=probs.cpu().numpy(),
        top_index=top_index.cpu().numpy(),
        top_score=top_score.cpu().numpy(),
        predicted=predicted.cpu().numpy(),
        loss=loss.cpu().numpy(),
        correct=correct.cpu().numpy(),
        pairs=pairs.cpu().numpy(),
        is_predicted=predicted[sample, target_cls].cpu().numpy(),
        is_label=labels[sample, target_cls].cpu().numpy(),
        maps={key: m.float().cpu().numpy() for key, m in maps.items()},
        scores=map_scores,
        located=located,
        occlusion=occluded,
        occlusion_scores=occlusion_scores,
        faithfulness=faithful,
        embeddings=_embeddings(forward, settings.layer, len(decoded)),
        properties={name: v.cpu().numpy() for name, v in signals.image_properties(pixels).items()},
        thumbnails=signals.thumbnails(pixels).cpu().numpy(),
        finite=torch.isfinite(scores).all(dim=1).cpu().numpy(),
    )


def _embeddings(forward: HookedForward, layer: str, count: int) -> np.ndarray:
    """(N, C) the explained layer's pooled activations; (N, 0) without a layer (a TorchScript
    model), which the near-duplicate detector reads as no embedding evidence."""
    if not layer:
        return np.zeros((count, 0), np.float32)
    return signals.pooled_embedding(forward.activations[layer].detach()).float().cpu().numpy()


def box_tolerance(input_size: int, map_height: int) -> float:
    """Half a map cell, in input pixels: the box tolerance of a map's box scores (16 px for a
    7x7 map at 224 px, close to the pointing game's 15 px)."""
    return input_size / (2 * map_height)


def _input_boxes(rows: pd.DataFrame, decoded: list[Decoded], device: torch.device) -> torch.Tensor:
    boxes = rows[["box_x0", "box_y0", "box_x1", "box_y1"]].to_numpy(dtype=np.float64)
    return torch.from_numpy(boxes_to_input(boxes, decoded)).float().to(device)
