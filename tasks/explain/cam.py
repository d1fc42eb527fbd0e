"""Grad-CAM engine: one forward for predictions and activations, gradients on activations only.

Grad-CAM (Selvaraju et al., 2017) for class c at a layer with activations A (K channels,
h x w positions)::

    alpha_k^c = 1/(h w) * sum_ij  d y^c / d A^k_ij          (channel weights)
    L^c       = ReLU( sum_k alpha_k^c A^k )                 (h x w map)

where y^c is the class score before the softmax/sigmoid. The engine starts from ONE
:func:`visaudit.tasks.model.hooks.hooked_forward` that yields both the class scores and
the activations, and takes the gradients of the scores with respect to those activations
only (``torch.autograd.grad``); every gradient method of the registry
(:mod:`visaudit.tasks.explain.registry`, weight functions in
:mod:`visaudit.tasks.explain.cam_family`) shares them. :func:`score_maps` places a map's
peak and its energy inside a box.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visaudit.tasks.explain.catalogue import GUIDED_METHODS, INPUT_LAYER
from visaudit.tasks.explain.registry import GRADIENT_METHODS
from visaudit.tasks.model.hooks import HookedForward


def target_rounds(sample: torch.Tensor) -> torch.Tensor:
    """Rank of each (image, target) pair within its image, for pairs sorted by image.

    Pairs of the same rank have at most one target per image, so one backward of the sum
    of their scores gives each image's own gradient (images are independent in eval mode).
    """
    counts = torch.bincount(sample)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sample.numel(), device=sample.device) - starts[sample]


def explain(
    forward: HookedForward,
    sample: torch.Tensor,
    target: torch.Tensor,
    methods: tuple[str, ...] = ("gradcam",),
) -> dict[tuple[str, str], torch.Tensor]:
    """Maps of every requested method at every hooked layer for (image, class) pairs.

    ``sample`` (M,) indexes images of the batch and ``target`` (M,) their classes; pairs
    must be sorted by ``sample``. Returns (method, layer) -> (M, h, w) maps, each
    ``ReLU``-ed, on the scores' device. All gradient methods share the same gradients: one
    ``autograd.grad`` per round (the most targets any image has), for all layers at once.

    Guided methods (the forward must be run with ``guided=True``) add one guided backward
    per round to the input, and are keyed at ``INPUT_LAYER``:
      guided_backprop  (M, 3, H, W)  the guided gradient of the class score w.r.t. the input
      guided_gradcam   (M, 3, H, W)  guided_backprop * Grad-CAM of the deepest hooked layer,
                                     upsampled to the input (Selvaraju et al. 2017, sec. 3.1)
    """
    known = set(GRADIENT_METHODS) | set(GUIDED_METHODS)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(sorted(known))}")
    guided = [m for m in methods if m in GUIDED_METHODS]
    if guided and (forward.inputs is None or forward.switch is None):
        raise ValueError(f"{guided} need a forward run with hooked_forward(..., guided=True)")
    layers = list(forward.activations)
    acts = [forward.activations[name] for name in layers]
    deepest = layers[-1]
    cam_methods = [m for m in methods if m in GRADIENT_METHODS]
    if "guided_gradcam" in methods and "gradcam" not in cam_methods:
        cam_methods.append("gradcam")  # needed for the product, dropped from the result below
    maps = {  # float32 whatever the activations' dtype (bf16 under autocast): maps are compared, summed, ranked
        (method, name): a.new_zeros((sample.numel(), *a.shape[2:]), dtype=torch.float32)
        for method in cam_methods
        for name, a in zip(layers, acts)
    }
    if guided:
        x = forward.inputs
        maps[("guided_backprop", INPUT_LAYER)] = x.new_zeros((sample.numel(), *x.shape[1:]), dtype=torch.float32)
    rounds = target_rounds(sample)
    n_rounds = int(rounds.max().item()) + 1 if rounds.numel() else 0
    for r in range(n_rounds):
        pick = (rounds == r).nonzero().squeeze(1)
        rows = sample[pick]
        objective = forward.scores[rows, target[pick]].sum()
        last = r == n_rounds - 1
        if cam_methods:
            grads = torch.autograd.grad(objective, acts, retain_graph=bool(guided) or not last)
            for name, a, g in zip(layers, acts, grads):
                a_rows, g_rows = a[rows].detach().float(), g[rows].float()
                for method in cam_methods:
                    maps[(method, name)][pick] = F.relu(GRADIENT_METHODS[method](a_rows, g_rows))
        if guided:
            assert forward.switch is not None and forward.inputs is not None
            forward.switch.on = True
            try:
                (g_input,) = torch.autograd.grad(objective, forward.inputs, retain_graph=not last)
            finally:
                forward.switch.on = False
            maps[("guided_backprop", INPUT_LAYER)][pick] = g_input[rows]
    if "guided_gradcam" in methods:
        backprop = maps[("guided_backprop", INPUT_LAYER)]
        size = backprop.shape[-2:]
        coarse = F.interpolate(maps[("gradcam", deepest)][:, None], size=size, mode="bilinear", align_corners=False)
        maps[("guided_gradcam", INPUT_LAYER)] = backprop * coarse
        if "guided_backprop" not in methods:
            del maps[("guided_backprop", INPUT_LAYER)]
    if "gradcam" not in methods:
        for name in layers:
            maps.pop(("gradcam", name), None)
    return maps


def grad_cam(forward: HookedForward, sample: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Grad-CAM maps, layer -> (M, h, w); see :func:`explain`."""
    return {layer: m for (_, layer), m in explain(forward, sample, target, ("gradcam",)).items()}


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(M, h, w) -> (M, size, size), bilinear, batched on the maps' device."""
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


@dataclass
class MapScores:
    """Per-map scores; box scores are NaN where the image has no box."""

    peak_row: torch.Tensor
    peak_col: torch.Tensor
    peak_x: torch.Tensor  # 0..1 of the input width
    peak_y: torch.Tensor
    energy_in_box: torch.Tensor
    box_area_fraction: torch.Tensor
    pointing_hit: torch.Tensor  # 1.0 / 0.0 / NaN


def pointing_tolerance(input_size: int) -> float:
    """The pointing game's 15 px tolerance (Zhang et al. 2016, at their 224 px input) scaled
    to the model input: 15 * input_size / 224 pixels (6.4 px at 96 px)."""
    return 15.0 * input_size / 224


def score_maps(
    maps: torch.Tensor, boxes: torch.Tensor, input_size: int, tolerance: float = 0.0,
    pointing: float | None = None,
) -> MapScores:
    """Peak location, and with a box (input pixels, (M,4) x0,y0,x1,y1; NaN = none) grown by
    ``tolerance`` pixels on each side (a coarse map cannot place its mass finer than its
    cells) for the energy, and by ``pointing`` pixels (default: ``tolerance``; the pointing
    game's, :func:`pointing_tolerance`) for the peak:

    energy_in_box = sum of the upsampled map inside the box / its total sum
                    (a uniform map scores the box-area fraction; Score-CAM's energy pointing game)
    pointing_hit  = the upsampled map's maximum lies inside the box (pointing game)
    """
    m, h, w = maps.shape
    flat_peak = maps.reshape(m, -1).argmax(dim=1)
    peak_row, peak_col = flat_peak // w, flat_peak % w
    up = upsample(maps, input_size)
    coords = torch.arange(input_size, device=maps.device, dtype=maps.dtype) + 0.5
    has_box = ~torch.isnan(boxes).any(dim=1)
    plain = torch.nan_to_num(boxes, nan=0.0).to(maps.dtype)

    def grown(by: float) -> torch.Tensor:  # (M, H, W): inside the box grown by ``by`` pixels
        safe = (plain + torch.tensor([-by, -by, by, by], device=plain.device, dtype=plain.dtype)).clamp(0, input_size)
        inside_x = (coords[None] >= safe[:, 0:1]) & (coords[None] < safe[:, 2:3])  # (M, W)
        inside_y = (coords[None] >= safe[:, 1:2]) & (coords[None] < safe[:, 3:4])  # (M, H)
        return inside_y[:, :, None] & inside_x[:, None, :]

    mask = grown(tolerance)
    total = up.sum(dim=(1, 2))
    energy = (up * mask).sum(dim=(1, 2)) / total
    area = mask.float().mean(dim=(1, 2))
    up_peak = up.reshape(m, -1).argmax(dim=1)
    point_mask = mask if pointing is None or pointing == tolerance else grown(pointing)
    hit = point_mask.reshape(m, -1).gather(1, up_peak[:, None])[:, 0].float()
    nan = torch.full_like(energy, float("nan"))
    return MapScores(
        peak_row=peak_row,
        peak_col=peak_col,
        peak_x=(peak_col.float() + 0.5) / w,
        peak_y=(peak_row.float() + 0.5) / h,
        energy_in_box=torch.where(has_box & (total > 0), energy, nan),
        box_area_fraction=torch.where(has_box, area, nan),
        pointing_hit=torch.where(has_box & (total > 0), hit, nan),
    )
