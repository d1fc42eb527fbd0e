"""RISE deletion and insertion (Petsiuk et al. 2018): does removing the most salient pixels
first destroy the class score fastest, and does restoring them first rebuild it fastest?

For a saliency map ranked most salient first, at step t = 0..T the first
k_t = round(t H W / T) pixels are deleted (replaced by a baseline, from the image) or
inserted (taken from the image, into a baseline); p_t is the target's probability (or
logit) after each step and the score is the normalised area under the curve::

    AUC = (sum_t p_t - (p_0 + p_T) / 2) / T

A faithful saliency gives a LOW deletion AUC and a HIGH insertion AUC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from visaudit.tasks.explain.perturb import (
    BASELINES,
    baseline_images,
    check_chunk,
    check_inputs,
    check_output,
    chunk_for,
    take,
    to_scores,
)
from visaudit.tasks.model.head import Head
from visaudit.tasks.model.hooks import eval_mode


@dataclass
class DeletionInsertion:
    """RISE curves (probability of the target after each step) and their normalised AUCs."""

    deletion_auc: torch.Tensor  # (N,)
    insertion_auc: torch.Tensor  # (N,)
    deletion_curve: torch.Tensor  # (N, steps + 1)
    insertion_curve: torch.Tensor  # (N, steps + 1)


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under curves (..., T+1) sampled at 0, 1/T, ..., 1: in [0, 1] for probabilities.

    AUC = (sum_t p_t - (p_0 + p_T) / 2) / T
    """
    steps = curve.shape[-1] - 1
    return (curve.sum(-1) - (curve[..., 0] + curve[..., -1]) / 2) / steps


def deletion_insertion(
    model: nn.Module,
    inputs: torch.Tensor,
    saliency: torch.Tensor,
    target: torch.Tensor,
    steps: int = 32,
    baseline: str = "zero",
    insertion_baseline: str = "blur",
    chunk_size: int | None = None,
    output: Literal["probability", "logit"] = "probability",
    head: Head = Head(multi_label=False),
) -> DeletionInsertion:
    """RISE deletion and insertion (Petsiuk et al. 2018), batched over images and steps.

    Pixels are ranked by ``saliency`` (N, h, w), upsampled bilinearly to the input, most
    salient first (ties in raster order). At step t = 0..T the first k_t = round(t H W / T)
    pixels are
      deletion:  replaced by ``baseline`` (RISE: zero), starting from the image;
      insertion: taken from the image, starting from ``insertion_baseline`` (RISE: blur);
    and p_t = probability (through ``head``) or logit of ``target[n]``. AUC = :func:`auc` of p: a faithful
    saliency gives a LOW deletion AUC and a HIGH insertion AUC. The N (T+1) x 2 perturbed
    copies run in chunks (automatic: :func:`visaudit.tasks.explain.perturb.chunk_for`).
    """
    check_inputs(inputs)
    check_output(output, head)
    check_chunk(chunk_size)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    for name, value in (("baseline", baseline), ("insertion_baseline", insertion_baseline)):
        if value not in BASELINES:
            raise ValueError(f"{name} must be one of {BASELINES}, got {value!r}")
    n, c, h, w = inputs.shape
    if saliency.dim() != 3 or saliency.shape[0] != n:
        raise ValueError(f"saliency must be (N, h, w) with N = {n}, got shape {tuple(saliency.shape)}")
    if target.shape != (n,):
        raise ValueError(f"target must be (N,) = ({n},) class indices, got shape {tuple(target.shape)}")
    device = inputs.device
    up = F.interpolate(saliency[:, None].float().to(device), size=(h, w), mode="bilinear", align_corners=False)
    order = up.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=device).expand(n, -1))
    rank = rank.view(n, h, w)
    kept = torch.round(torch.arange(steps + 1, device=device, dtype=torch.float64) * (h * w) / steps).long()
    target = target.to(device)
    with eval_mode(model), torch.inference_mode():
        x = inputs.detach()
        fills = {
            "deletion": baseline_images(x, baseline).to(x.dtype),
            "insertion": baseline_images(x, insertion_baseline).to(x.dtype),
        }
        chunk_size, _ = chunk_for(model, x, chunk_size)
        per_mode = n * (steps + 1)
        curves = torch.empty((2 * per_mode,), dtype=torch.float32, device=device)
        for start in range(0, 2 * per_mode, chunk_size):
            pair = torch.arange(start, min(start + chunk_size, 2 * per_mode), device=device)
            insertion = pair >= per_mode
            local = pair % per_mode
            image, step = local // (steps + 1), local % (steps + 1)
            muted = rank[image] < kept[step][:, None, None]  # (c, H, W): the first k_t pixels
            # deletion: muted -> fill; insertion: muted -> image, the rest -> fill
            from_image = torch.where(insertion[:, None, None], muted, ~muted)[:, None]
            fill = torch.where(
                insertion[:, None, None, None],
                take(fills["insertion"], image).expand(-1, c, h, w),
                take(fills["deletion"], image).expand(-1, c, h, w),
            )
            batch = torch.where(from_image, x[image], fill)
            scores = to_scores(model(batch), output, head)
            curves[start : start + pair.numel()] = scores.gather(1, target[image][:, None])[:, 0]
        deletion = curves[:per_mode].view(n, steps + 1).clone()
        insertion_curve = curves[per_mode:].view(n, steps + 1).clone()
    return DeletionInsertion(auc(deletion), auc(insertion_curve), deletion, insertion_curve)
