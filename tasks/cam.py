"""Grad-CAM engine: one forward for predictions and activations, gradients on activations only.

Grad-CAM (Selvaraju et al., 2017) for class c at a layer with activations A (K channels,
h x w positions)::

    alpha_k^c = 1/(h w) * sum_ij  d y^c / d A^k_ij          (channel weights)
    L^c       = ReLU( sum_k alpha_k^c A^k )                 (h x w map)

where y^c is the class score before the softmax/sigmoid. The engine hooks the layers to
explain, runs ONE forward that yields both the class scores and the activations, and
takes the gradients of the scores with respect to those activations only
(``torch.autograd.grad``): no parameter gradients are computed or accumulated, and the
user's model is left exactly as it was (hooks removed, ``requires_grad`` restored), even
when something raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HookedForward:
    """Class scores (with the graph back to the activations) and the hooked activations."""

    scores: torch.Tensor  # (N, K)
    activations: dict[str, torch.Tensor]  # layer -> (N, C, h, w), part of the graph


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter for the duration, then restore the flags.

    With frozen parameters the forward records a graph only from the first hooked
    activation onwards, so nothing before the explained layer is kept for backward.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def hooked_forward(model: nn.Module, inputs: torch.Tensor, layers: list[str]) -> HookedForward:
    """Run the model once, capturing the outputs of ``layers`` as differentiable activations.

    The first hooked output met during the forward is detached into a leaf that requires
    grad; later ones are already in the graph. Each hook hands a clone downstream, so an
    in-place op after the layer (``ReLU(inplace=True)``) cannot alter the captured values.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("Grad-CAM needs autograd; call it outside torch.inference_mode()")
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"layers not found in the model: {missing}")
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            captured[name] = output
            return output.clone()

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in layers]
    try:
        with frozen_parameters(model), torch.enable_grad():
            scores = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    not_reached = [name for name in layers if name not in captured]
    if not_reached:
        raise ValueError(f"layers never ran in the forward pass: {not_reached}")
    return HookedForward(scores, captured)


def target_rounds(sample: torch.Tensor) -> torch.Tensor:
    """Rank of each (image, target) pair within its image, for pairs sorted by image.

    Pairs of the same rank have at most one target per image, so one backward of the sum
    of their scores gives each image's own gradient (images are independent in eval mode).
    """
    counts = torch.bincount(sample)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sample.numel(), device=sample.device) - starts[sample]


def grad_cam(
    forward: HookedForward, sample: torch.Tensor, target: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Grad-CAM maps for (image, class) pairs at every hooked layer.

    ``sample`` (M,) indexes images of the batch and ``target`` (M,) their classes; pairs
    must be sorted by ``sample``. Returns layer -> (M, h, w) maps, on the scores' device.
    Costs one ``autograd.grad`` per round (the most targets any image has).
    """
    layers = list(forward.activations)
    acts = [forward.activations[name] for name in layers]
    maps: dict[str, torch.Tensor] = {
        name: a.new_zeros((sample.numel(), *a.shape[2:])) for name, a in zip(layers, acts)
    }
    rounds = target_rounds(sample)
    n_rounds = int(rounds.max().item()) + 1 if rounds.numel() else 0
    for r in range(n_rounds):
        pick = (rounds == r).nonzero().squeeze(1)
        objective = forward.scores[sample[pick], target[pick]].sum()
        grads = torch.autograd.grad(objective, acts, retain_graph=r < n_rounds - 1)
        for name, a, g in zip(layers, acts, grads):
            rows = sample[pick]
            weights = g[rows].mean(dim=(2, 3), keepdim=True)
            maps[name][pick] = F.relu((weights * a[rows].detach()).sum(dim=1))
    return maps


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


def score_maps(maps: torch.Tensor, boxes: torch.Tensor, input_size: int) -> MapScores:
    """Peak location, and with a box (input pixels, (M,4) x0,y0,x1,y1; NaN = none):

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
    safe = torch.nan_to_num(boxes, nan=0.0).to(maps.dtype)
    inside_x = (coords[None] >= safe[:, 0:1]) & (coords[None] < safe[:, 2:3])  # (M, W)
    inside_y = (coords[None] >= safe[:, 1:2]) & (coords[None] < safe[:, 3:4])  # (M, H)
    mask = inside_y[:, :, None] & inside_x[:, None, :]
    total = up.sum(dim=(1, 2))
    energy = (up * mask).sum(dim=(1, 2)) / total
    area = mask.float().mean(dim=(1, 2))
    up_peak = up.reshape(m, -1).argmax(dim=1)
    hit = mask.reshape(m, -1).gather(1, up_peak[:, None])[:, 0].float()
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
