"""The probes behind ``shortcut_cue``: near-identical content on a FRACTION of a class, at
one or several places, that the model takes as the class, confirmed by intervention (the
detector, which judges their results, is ``shortcut_cue``).

Unlike ``fixed_location`` it needs no spot shared by most of the class (a watermark on 40%
of a class, a token in a random corner), and it does not start from the Grad-CAM peaks: at
a coarse layer they miss a small token (on ``benchmarks/cues.py``'s token case the token's
cell ranked 10th-15th of 16 in most of its class's maps). The search is over the whole
image; the interventions decide whether the model uses what it found.

1. **Recurring content.** Every second crop ``a`` of side s = ``CUE_SIDE`` x the input side
   (crops at stride s/4; images above ``WORK_SIZE`` are area-downsampled for the search) of
   every sampled image of the class is an anchor. Crops are compared by their pattern
   (each channel less its mean). Its match distance to image j is its best RMS distance
   to a crop of j::

       d(a, j) = min_{w in j} ||a - w||_2 / sqrt(D),      ratio(a, j) = d(a, j) / (||a||_2 / sqrt(D))

   the error of the best match relative to the anchor's own contrast (0: the same pixels;
   about sqrt(2) for unrelated texture; a flat anchor has no contrast to match). a
   matches j when ratio(a, j) <= ``cue_match_ratio``; the anchor matching most images is
   the cue. It is then matched again at stride s/8 (a 1-px offset can break a match at
   the coarse stride), and the images it matches there (with its own) are the carriers.
   A stamp is the same pixels in every carrier, only the background under it differs.
2. **Paste** (decides). Each carrier's matched crop (the cue with its own background) is
   pasted onto an image of another class at that carrier's place: the share of them that
   turn to the class, against the share that turn when the control is pasted there
   instead: in one of the class's other images, the crop most like the cue (its best
   match there, too far to be the same). Instances against instances: a fragment of a
   recurring object (a loop of an 8) has look-alikes in the class's other images that
   turn others as often; a stamp the model reads has none. (A median of the carriers'
   crops would be an idealised fragment, stronger than any real one: on the cues
   benchmark it turned 34% of other images into 'eight' against 16% for single crops.)
3. **Remove** (reported). In the carriers the matched crop (and a margin of s/4) is filled
   with its local background (the per-channel mean of a ring of that margin around it):
   the mean drop of the class's probability, against the drop when the class's other
   images get the same fill at their look-alikes. It does not decide: removing part of
   the object also drops the class. With fewer than two other images the controls come
   from a far corner of the carriers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from visaudit.tasks.data.records import MetricRow
from visaudit.tasks.findings.inputs import true_class
from visaudit.tasks.findings.probe_records import CueProbe
from visaudit.tasks.findings.thresholds import Thresholds

# Method parameters (how the cue is measured, not when it is flagged: those are in Thresholds)
CUE_SIDE = 0.25  # side of the attended crop, a fraction of the input side; its search region is twice that
CUE_IMAGES = 48  # images of a class sampled for the search (and of the other classes, for pasting)
WORK_SIZE = 64  # inputs larger than this are searched at this side (area-downsampled); interventions at full size


@dataclass(frozen=True)
class CueSample:
    """Images of one class that the search reads."""

    class_name: str
    image_ids: tuple[str, ...]


@dataclass(frozen=True)
class CueMatch:
    """The recurring attended content of a class sample (test 1)."""

    members: np.ndarray  # indices into the sample of the carriers (the seed first)
    corners: np.ndarray  # (N, 2) top-left (x, y) pixels of the cue's best match in every image
    side: int  # the crop's side in pixels of the input
    ratio: float  # median match ratio of the carriers to the seed (0 = identical)


def cue_samples(audited: pd.DataFrame, t: Thresholds) -> list[CueSample]:
    """Per class with at least ``min_class_images`` audited images (by their single label), the
    first ``CUE_IMAGES`` of them by image id."""
    labels = true_class(audited)
    frame = audited[["image_id"]].assign(label=labels)[labels.notna()].sort_values("image_id", kind="stable")
    return [CueSample(str(name), tuple(group["image_id"].iloc[:CUE_IMAGES]))
            for name, group in frame.groupby("label", sort=True) if len(group) >= t.min_class_images]


def other_images(audited: pd.DataFrame, class_name: str, count: int = CUE_IMAGES) -> list[str]:
    """Up to ``count`` image ids of other classes, spread evenly over the run (by image id)."""
    labels = true_class(audited)
    ids = audited.loc[labels.notna() & (labels != class_name), "image_id"].sort_values().to_numpy()
    if len(ids) <= count:
        return ids.tolist()
    return ids[np.linspace(0, len(ids) - 1, count).round().astype(int)].tolist()


def _crops(inputs: torch.Tensor, corners: torch.Tensor, side: int) -> torch.Tensor:
    """(N, C, side, side) crops of (N, C, S, S) ``inputs`` at top-left ``corners`` (N, 2: x, y)."""
    steps = torch.arange(side, device=inputs.device)
    rows = (corners[:, 1, None] + steps)[:, :, None]
    cols = (corners[:, 0, None] + steps)[:, None, :]
    picked = inputs[torch.arange(len(inputs), device=inputs.device)[:, None, None], :, rows, cols]  # (N, s, s, C)
    return picked.permute(0, 3, 1, 2)


def _windows(regions: torch.Tensor, side: int, stride: int) -> torch.Tensor:
    """Every crop of ``side`` (at ``stride``) of each region (M, C, r, r), each channel less its
    mean (its pattern, not its colour: colour cues are ``colour_shortcut``'s), flattened: (M, L, D)."""
    m, c = regions.shape[:2]
    windows = torch.nn.functional.unfold(regions, side, stride=stride).view(m, c, side * side, -1)
    return (windows - windows.mean(dim=2, keepdim=True)).flatten(1, 2).permute(0, 2, 1)


def _best_match(anchors: torch.Tensor, windows: torch.Tensor, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Best RMS distance of every anchor (A, D) to a window of every region (M, L, D), and
    that window's index: both (A, M), in chunks of ``rows`` anchors."""
    m, positions, d = windows.shape
    flat = windows.reshape(m * positions, d)
    values, indices = [], []
    for part in anchors.split(rows):
        best = (torch.cdist(part, flat) / np.sqrt(d)).view(len(part), m, positions).min(dim=2)
        values.append(best.values)
        indices.append(best.indices)
    return torch.cat(values), torch.cat(indices)


def _fine_match(anchor: torch.Tensor, x: torch.Tensor, side: int, stride: int,
                budget: int = 16 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_best_match` of one anchor (1, D) to every crop at ``stride`` of ``x`` (N, C, S, S),
    a few images at a time: the windows of all images at a fine stride would be ~110 MB for 48
    images of 48 px (and three copies in flight), each chunk's under ``budget`` bytes."""
    n, c, size, _ = x.shape
    per_row = (size - side) // stride + 1
    per_image = c * side * side * per_row * per_row * x.element_size()
    parts = [_best_match(anchor, _windows(chunk, side, stride)) for chunk in x.split(max(1, budget // per_image))]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def find_cue(inputs: torch.Tensor, max_ratio: float) -> CueMatch | None:
    """Test 1 on (N, C, S, S) inputs of a class: every second crop of side s (at stride s/4) of
    every image is an anchor; it matches image j when its best distance to a crop of j is at
    most ``max_ratio`` x its own RMS. The anchor matching most images is the cue, those images
    its carriers (the anchor's image first); None when no anchor matches another image."""
    n, _, size, _ = inputs.shape
    x = inputs.float()
    if size > WORK_SIZE:
        x = torch.nn.functional.interpolate(x, size=(WORK_SIZE, WORK_SIZE), mode="area")
    work = x.shape[-1]
    side = max(3, round(work * CUE_SIDE))
    stride = max(1, side // 4)
    windows = _windows(x, side, stride)  # (N, L, D)
    per_row = (work - side) // stride + 1
    grid = torch.arange(per_row * per_row, device=x.device)
    kept = torch.nonzero((grid % per_row % 2 == 0) & (grid // per_row % 2 == 0)).flatten()  # anchors every 2nd crop
    positions = len(kept)
    anchors = windows[:, kept].reshape(n * positions, -1)
    distance, best = _best_match(anchors, windows)  # (N*A, N)
    contrast = (anchors.norm(dim=1) / np.sqrt(anchors.shape[1])).clamp(min=1e-12)  # the anchor's own RMS
    matches = distance / contrast[:, None] <= max_ratio
    owner = torch.arange(n * positions, device=x.device) // positions
    matches[torch.arange(n * positions, device=x.device), owner] = False
    counts = matches.sum(dim=1)
    anchor = int(counts.argmax())
    if int(counts[anchor]) < 1:
        return None
    seed = anchor // positions
    fine = max(1, side // 8)  # the chosen anchor matched again at a finer stride: every carrier, aligned
    fine_row = (work - side) // fine + 1
    fine_distance, fine_best = _fine_match(anchors[anchor : anchor + 1], x, side, fine)
    ratio = fine_distance[0] / contrast[anchor]
    ratio[seed] = 0.0
    partners = torch.nonzero(ratio <= max_ratio).flatten()
    members = torch.cat([partners.new_tensor([seed]), partners[partners != seed]])
    found = torch.stack([fine_best[0] % fine_row, fine_best[0] // fine_row], dim=1) * fine
    own = kept[anchor % positions]
    found[seed] = torch.stack([own % per_row, own // per_row]) * stride
    full_side = max(2, round(side * size / work))
    corners = (found.double() * size / work).round().long().clamp(0, size - full_side)
    ratio = ratio[members[1:]]
    return CueMatch(members=members.cpu().numpy(), corners=corners.cpu().numpy(), side=full_side,
                    ratio=float(ratio.median()))


def far_corners(corners: np.ndarray, side: int, size: int) -> np.ndarray:
    """For each top-left corner (N, 2), the image corner square of ``side`` farthest from it."""
    options = np.array([[0, 0], [size - side, 0], [0, size - side], [size - side, size - side]])
    gaps = np.hypot(*(corners[:, None, :] - options[None, :, :]).transpose(2, 0, 1))
    return options[gaps.argmax(axis=1)]


def paste(inputs: torch.Tensor, patches: torch.Tensor, corners: np.ndarray) -> torch.Tensor:
    """A copy of ``inputs`` (N, C, S, S) with ``patches`` (N, C, s, s) pasted at ``corners`` (N, 2)."""
    side = patches.shape[-1]
    out = inputs.clone()
    steps = torch.arange(side, device=inputs.device)
    at = torch.as_tensor(corners, device=inputs.device)
    rows = (at[:, 1, None] + steps)[:, :, None]
    cols = (at[:, 0, None] + steps)[:, None, :]
    out[torch.arange(len(out), device=out.device)[:, None, None], :, rows, cols] = patches.permute(0, 2, 3, 1)
    return out


def fill_background(inputs: torch.Tensor, corners: np.ndarray, side: int, margin: int) -> torch.Tensor:
    """A copy of ``inputs`` with the square at ``corners`` (grown by ``margin``) filled with the
    per-channel mean of the ring of width ``margin`` around it (its local background)."""
    size = inputs.shape[-1]
    grid = torch.arange(size, device=inputs.device)
    at = torch.as_tensor(corners, device=inputs.device)

    def box(grow: int) -> torch.Tensor:
        left, top = (at[:, 0] - grow)[:, None], (at[:, 1] - grow)[:, None]
        inside_x = (grid[None] >= left) & (grid[None] < left + side + 2 * grow)
        inside_y = (grid[None] >= top) & (grid[None] < top + side + 2 * grow)
        return (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (N, 1, S, S)

    hole, outer = box(margin), box(2 * margin)
    ring = (outer & ~hole).to(inputs.dtype)
    mean = (inputs * ring).sum(dim=(2, 3), keepdim=True) / ring.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    return torch.where(hole, mean, inputs)


def _predict(model: torch.nn.Module, batch: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Probabilities of ``batch`` in chunks, eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        chunk = 64 if batch.is_cuda else 16
        scores = torch.cat([model(part) for part in batch.split(chunk)]).float()
    finally:
        model.train(was_training)
    return torch.sigmoid(scores) if multi_label else torch.softmax(scores, dim=1)


def _distinct_places(corners: np.ndarray, side: int, size: int) -> tuple[tuple[float, float], ...]:
    """The carriers' crop centres as fractions, rounded to a 0.05 grid, most frequent first."""
    centres = np.round((corners + side / 2) / size / 0.05) * 0.05
    values, counts = np.unique(centres, axis=0, return_counts=True)
    return tuple((float(a), float(b)) for a, b in values[np.argsort(-counts, kind="stable")])


@torch.no_grad()
def probe_cue(
    model: torch.nn.Module,
    sample: CueSample,
    inputs: torch.Tensor,
    others: torch.Tensor,
    class_index: int,
    t: Thresholds,
    multi_label: bool = False,
) -> CueProbe | None:
    """Tests 1 to 3 for one class: ``inputs`` (N, C, S, S) are ``sample``'s images in order,
    ``others`` images of other classes. None when no recurring content is found or it
    covers less than ``cue_min_share`` of the sample (the model is then not run)."""
    if len(inputs) != len(sample.image_ids):
        raise ValueError(f"probe_cue: {len(inputs)} inputs for {len(sample.image_ids)} sampled images")
    match = find_cue(inputs, t.cue_match_ratio)
    if match is None or len(match.members) / len(inputs) < t.cue_min_share or len(match.members) < t.min_class_images:
        return None
    size = inputs.shape[-1]
    side = match.side
    device = inputs.device
    carriers = inputs[torch.as_tensor(match.members, device=device)]
    carrier_corners = match.corners[match.members]
    rest = np.setdiff1d(np.arange(len(inputs)), match.members)
    if len(rest) >= 2:  # the control: in the class's other images, their best look-alike of the cue
        sources, source_corners = inputs[torch.as_tensor(rest, device=device)], match.corners[rest]
    else:  # the cue is on (nearly) every image: a far corner of the carriers
        sources, source_corners = carriers, far_corners(carrier_corners, side, size)
    controls = _crops(sources, torch.as_tensor(source_corners, device=device), side)
    margin = max(1, side // 4)
    k = len(others)
    cycle = np.arange(k) % len(carriers)  # other image i gets carrier cycle[i]'s crop, at its place
    places = carrier_corners[cycle]
    cues = _crops(carriers, torch.as_tensor(carrier_corners, device=device), side)[torch.as_tensor(cycle, device=device)]
    batch = torch.cat([
        carriers, fill_background(carriers, carrier_corners, side, margin),
        sources, fill_background(sources, source_corners, side, margin),
        others, paste(others, cues, places),
        paste(others, controls[torch.arange(k, device=device) % len(controls)], places),
    ])
    probs = _predict(model, batch, multi_label).cpu()
    own, is_class = probs[:, class_index], probs.argmax(dim=1) == class_index
    m, c = len(carriers), len(sources)
    kept, removed = own[:m], own[m : 2 * m]
    control_kept, control_removed = own[2 * m : 2 * m + c], own[2 * m + c : 2 * m + 2 * c]
    predicted, still = is_class[:m], is_class[m : 2 * m]
    start = 2 * m + 2 * c
    outside = ~is_class[start : start + k]  # other classes' images not predicted as the class before
    pasted, control_pasted = is_class[start + k : start + 2 * k][outside], is_class[start + 2 * k :][outside]
    nan = float("nan")
    ids = np.asarray(sample.image_ids)[match.members]
    return CueProbe(
        class_name=sample.class_name, images=len(inputs), carriers=tuple(ids.tolist()),
        share=len(match.members) / len(inputs), ratio=match.ratio, side=side / size,
        places=_distinct_places(carrier_corners, side, size), others=int(outside.sum()),
        flip_share=float(pasted.float().mean()) if len(pasted) else nan,
        control_flip_share=float(control_pasted.float().mean()) if len(pasted) else nan,
        drop=float((kept - removed).mean()), control_drop=float((control_kept - control_removed).mean()),
        removal_flip_share=float((predicted & ~still).sum() / predicted.sum()) if predicted.any() else 0.0,
    )


def probe_cues(
    model: torch.nn.Module,
    samples: list[CueSample],
    load: Callable[[list[str]], torch.Tensor],
    audited: pd.DataFrame,
    classes: list[str],
    t: Thresholds,
    multi_label: bool = False,
) -> dict[str, CueProbe]:
    """:func:`probe_cue` for every sampled class; ``load`` turns image ids into a batch of
    inputs (classes whose images no longer all load are skipped)."""
    probes = {}
    for sample in samples:
        inputs = load(list(sample.image_ids))
        if len(inputs) != len(sample.image_ids):
            continue
        probe = probe_cue(model, sample, inputs, load(other_images(audited, sample.class_name)),
                          classes.index(sample.class_name), t, multi_label)
        if probe is not None:
            probes[sample.class_name] = probe
    return probes


def cue_metric_rows(probes: dict[str, CueProbe], layer: str) -> list[MetricRow]:
    """``metrics`` rows of every probed class, flagged or not: its carrier share, match ratio,
    paste and removal effects and their controls (method gradcam, at ``layer``, detail its places)."""
    rows = []
    for name, p in sorted(probes.items()):
        detail = "places=" + " ".join(f"({x:.2f},{y:.2f})" for x, y in p.places[:8])
        for metric, value in (("cue_share", p.share), ("cue_match_ratio", p.ratio), ("cue_flip_share", p.flip_share),
                              ("cue_control_flip_share", p.control_flip_share), ("cue_drop", p.drop),
                              ("cue_control_drop", p.control_drop)):
            rows.append(MetricRow(metric=metric, value=float(value), images=p.images, method="gradcam", layer=layer,
                                  class_name=name, detail=detail))
    return rows
