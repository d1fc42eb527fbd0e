"""Explanations under adversarial noise (Grad-CAM paper, sec. 6.2): PGD in the [0, 1] pixel
space, then Grad-CAM of the original and of the adversarial class on the adversarial image.

Untargeted PGD with an L-inf budget (Madry et al. 2018): for image ``x`` (pixels in [0, 1],
before the model's normalisation ``n``), its clean top-1 class ``y`` and budget ``eps``::

    x_0     = clip_[0,1]( x + U(-eps, eps) )                          (random start)
    x_{t+1} = clip_[0,1]( clip_[x-eps, x+eps]( x_t + alpha * sign( grad_x CE(f(n(x_t)), y) ) ) )
    alpha   = step_ratio * eps / steps                                (2.5 eps / steps by default)

and the attack succeeds when ``argmax f(n(x_T)) != y``. Every (image, budget) pair is one row
of one batch, so the ladder of budgets runs as batched tensors (chunks of ``batch_size`` rows).
The gradient is taken with respect to the pixels only (parameters frozen, eval mode, both
restored). Grad-CAM comes from the audit's own engine (:mod:`visaudit.tasks.explain.cam`):
the clean map of ``y``, the map of ``y`` on ``x_T`` and the map of the adversarial class on
``x_T``; the two maps of ``y`` are compared with Spearman's rank correlation over the map
cells (:func:`visaudit.tasks.explain.ranks.spearman`) and, with a box, the pointing game.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visaudit.tasks.explain import cam
from visaudit.tasks.explain.ranks import spearman
from visaudit.tasks.model.hooks import eval_mode, frozen_parameters, hooked_forward

ToInput = Callable[[torch.Tensor], torch.Tensor]  # [0, 1] RGB pixels -> the model's input (differentiable)


@dataclass(frozen=True)
class AttackSettings:
    """PGD's parameters: budgets in [0, 1] pixel units, steps, step size ratio, random start, seed."""

    epsilons: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    steps: int = 10
    step_ratio: float = 2.5  # alpha = step_ratio * eps / steps
    random_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.epsilons or any(not 0 < e <= 1 for e in self.epsilons):
            raise ValueError(f"epsilons must be in (0, 1] (pixel units; 2/255 = 0.0078), got {self.epsilons}")
        if self.steps < 1 or self.step_ratio <= 0:
            raise ValueError(f"steps must be >= 1 and step_ratio > 0, got {self.steps} and {self.step_ratio}")


def pgd(model: nn.Module, pixels: torch.Tensor, target: torch.Tensor, epsilon: torch.Tensor,
        settings: AttackSettings, to_input: ToInput, batch_size: int = 64) -> torch.Tensor:
    """Untargeted L-inf PGD (see the module's equation) on rows of ``pixels`` (M, 3, H, W) in
    [0, 1], each away from its class ``target`` (M,) within its own budget ``epsilon`` (M,);
    returns the adversarial pixels (M, 3, H, W), within the budget and in [0, 1]. The random
    start is drawn for all rows at once from ``settings.seed``, so chunking does not change it."""
    if pixels.dim() != 4 or not (target.shape == epsilon.shape == pixels.shape[:1]):
        raise ValueError(f"pixels (M,3,H,W), target (M,) and epsilon (M,) expected, got "
                         f"{tuple(pixels.shape)}, {tuple(target.shape)}, {tuple(epsilon.shape)}")
    if float(pixels.min()) < 0 or float(pixels.max()) > 1:
        raise ValueError("pixels must be in [0, 1] (before the model's normalisation)")
    eps = epsilon.to(pixels.dtype).view(-1, 1, 1, 1)
    start = pixels.clone()
    if settings.random_start:
        generator = torch.Generator(device=pixels.device).manual_seed(settings.seed)
        noise = torch.rand(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
        start = (pixels + (2 * noise - 1) * eps).clamp(0, 1)
    out = torch.empty_like(pixels)
    with eval_mode(model), frozen_parameters(model), torch.enable_grad():
        for begin in range(0, pixels.shape[0], batch_size):
            rows = slice(begin, begin + batch_size)
            clean, e, y = pixels[rows], eps[rows], target[rows]
            alpha = settings.step_ratio * e / settings.steps
            x = start[rows]
            for _ in range(settings.steps):
                x = x.detach().requires_grad_(True)
                loss = F.cross_entropy(model(to_input(x)), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
                x = torch.min(torch.max(x.detach() + alpha * grad.sign(), clean - e), clean + e).clamp(0, 1)
            out[rows] = x.detach()
    return out


@dataclass(frozen=True)
class AdversarialMaps:
    """One row per (image, budget): the attack's outcome and the three Grad-CAM maps.

    ``image`` indexes the clean images; maps are (M, h, w) at ``layer``; pointing hits are
    1.0 / 0.0, NaN without a box; ``spearman`` is NaN where a map is constant."""

    image: torch.Tensor  # (M,) index of the clean image
    epsilon: torch.Tensor  # (M,) budget, [0, 1] pixel units
    pixels: torch.Tensor  # (M, 3, H, W) adversarial pixels in [0, 1]
    linf: torch.Tensor  # (M,) max |x_T - x| measured
    original: torch.Tensor  # (M,) the clean top-1 class
    adversarial: torch.Tensor  # (M,) top-1 class on x_T
    adversarial_confidence: torch.Tensor  # (M,) its probability on x_T
    original_probability: torch.Tensor  # (M,) probability of the clean class on x_T
    success: torch.Tensor  # (M,) bool: adversarial != original
    clean_map: torch.Tensor  # Grad-CAM of the original class on x
    original_map: torch.Tensor  # ... of the original class on x_T
    adversarial_map: torch.Tensor  # ... of the adversarial class on x_T
    spearman: torch.Tensor  # (M,) rank correlation of original_map with clean_map
    hit_clean: torch.Tensor  # pointing game of clean_map on the box
    hit_original: torch.Tensor  # ... of original_map
    hit_adversarial: torch.Tensor  # ... of adversarial_map


def attack_and_explain(model: nn.Module, pixels: torch.Tensor, boxes: torch.Tensor, layer: str,
                       settings: AttackSettings, to_input: ToInput, batch_size: int = 64) -> AdversarialMaps:
    """PGD at every budget of ``settings`` on every image of ``pixels`` (N, 3, H, W) in [0, 1],
    away from each image's clean top-1 class (softmax head), then Grad-CAM at ``layer``.

    ``boxes`` (N, 4) in input pixels (NaN: none) score the pointing game, with its 15 px
    tolerance at 224 px (:func:`visaudit.tasks.explain.cam.pointing_tolerance`). Rows are image-major:
    row = image * len(epsilons) + budget index."""
    n, budgets = pixels.shape[0], len(settings.epsilons)
    clean_scores, clean_maps = _maps(model, pixels, None, layer, to_input, batch_size)
    original = clean_scores.argmax(dim=1)
    image = torch.arange(n, device=pixels.device).repeat_interleave(budgets)
    epsilon = torch.tensor(settings.epsilons, device=pixels.device, dtype=pixels.dtype).repeat(n)
    adv = pgd(model, pixels[image], original[image], epsilon, settings, to_input, batch_size)
    scores, maps = _maps(model, adv, original[image], layer, to_input, batch_size)
    probabilities = scores.softmax(dim=1)
    adversarial = probabilities.argmax(dim=1)
    original_map, adversarial_map = maps[0::2], maps[1::2]
    clean_map = clean_maps[image]
    size = int(pixels.shape[-1])
    row_boxes = boxes.to(pixels.device, torch.float32)[image]
    tolerance = cam.pointing_tolerance(size)
    hits = [cam.score_maps(m, row_boxes, size, tolerance).pointing_hit for m in (clean_map, original_map,
                                                                                 adversarial_map)]
    return AdversarialMaps(
        image=image, epsilon=epsilon, pixels=adv, linf=(adv - pixels[image]).abs().amax(dim=(1, 2, 3)),
        original=original[image], adversarial=adversarial,
        adversarial_confidence=probabilities.gather(1, adversarial[:, None])[:, 0],
        original_probability=probabilities.gather(1, original[image][:, None])[:, 0],
        success=adversarial != original[image],
        clean_map=clean_map, original_map=original_map, adversarial_map=adversarial_map,
        spearman=spearman(original_map.flatten(1), clean_map.flatten(1)).float(),
        hit_clean=hits[0], hit_original=hits[1], hit_adversarial=hits[2],
    )


def _maps(model: nn.Module, pixels: torch.Tensor, original: torch.Tensor | None, layer: str, to_input: ToInput,
          batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores (M, K) and Grad-CAM maps at ``layer``, by chunks of ``batch_size`` images.

    ``original`` None: one map per image, of its own top-1 class. Else two per image,
    interleaved: of ``original`` and of the image's own top-1 class (2M, h, w)."""
    scores, maps = [], []
    with eval_mode(model):
        for begin in range(0, pixels.shape[0], batch_size):
            rows = slice(begin, begin + batch_size)
            forward = hooked_forward(model, to_input(pixels[rows]), [layer])
            top = forward.scores.detach().argmax(dim=1)
            count = top.numel()
            if original is None:
                sample, target = torch.arange(count, device=top.device), top
            else:
                sample = torch.arange(count, device=top.device).repeat_interleave(2)
                target = torch.stack([original[rows], top], dim=1).flatten()
            maps.append(cam.grad_cam(forward, sample, target)[layer].detach())
            scores.append(forward.scores.detach().float())
    return torch.cat(scores), torch.cat(maps)
