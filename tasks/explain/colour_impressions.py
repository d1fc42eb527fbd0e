"""Colour impressions: the class impression at the coarsest scale, the plain colour whose flat
image raises each class most (a probe for colour and background shortcuts, see
:func:`colour_impressions`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD
from visaudit.tasks.explain.impression_settings import ImpressionSettings
from visaudit.tasks.explain.impressions import check_classes, checked_scores, class_objective, placement
from visaudit.tasks.model.head import Head
from visaudit.tasks.model.hooks import eval_mode, frozen_parameters


@dataclass
class ColourImpression:
    """The plain colour that raises each class most (see :func:`colour_impressions`)."""

    classes: list[int]
    colours: torch.Tensor  # (K, 3) uint8 RGB, on the CPU
    logits: torch.Tensor  # (K, C) the model's scores of a plain image of each colour
    probability: torch.Tensor  # (K,) softmax (sigmoid for multi-label) of each colour's own class
    grid_colours: int  # how many colours the grid search scored


def colour_impressions(
    model: nn.Module,
    classes: Sequence[int],
    settings: ImpressionSettings | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: torch.device | str | None = None,
    *,
    multi_label: bool = False,
    chunk: int = 64,
) -> ColourImpression:
    """The class impression at the coarsest scale: for each class, the plain colour whose flat
    S x S image the model gives the class most, by the impressions' objective o (log-odds or logit)::

        rgb_k = argmax_{u in [0, 1]^3}  o_{c_k}( n( u 1_{S x S} ) )

    A data-free probe for colour shortcuts: a model that calls an empty blue image "circle" with
    probability 0.96 has learnt the blue background of its circles (the demo's planted bias; the
    full impressions there show the discs, the evidence that raises the class even more). The
    objective over colours is not concave (on the demo model, gradient ascent from mid-grey stopped
    at a grey-blue worth p = 0.06 where the planted blue gives 0.41), so the colours are first
    searched on a grid, levels^3 colours u_i = (i + 1/2) / levels (rounded to uint8 levels, so their
    scores are final) scored in chunks without gradients (one set of forwards serves every class),
    then each class's best grid colour is refined by ``colour_steps`` Adam steps on logit(u), all K
    classes as one batch, and kept if it scores better. The model is left as it was; nothing is random.
    """
    settings = ImpressionSettings() if settings is None else settings
    classes = check_classes(classes)
    levels = settings.colour_levels
    if levels < 1:
        raise ValueError("colour_levels is 0: colour impressions are switched off in these settings")
    device, mean_t, std_t = placement(model, device, mean, std, "colour impressions")
    head = Head(multi_label)
    size, k = settings.image_size, len(classes)
    rows = torch.arange(k, device=device)
    target = torch.tensor(classes, device=device)

    def flat(colours: torch.Tensor) -> torch.Tensor:
        return ((colours.view(-1, 3, 1, 1) - mean_t) / std_t).expand(-1, 3, size, size)

    def objective(scores: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N, K): every colour for every class
        n = scores.shape[0]
        per_class = [class_objective(scores, torch.arange(n, device=device), torch.full((n,), c, device=device),
                                     settings.objective, head) for c in classes]
        return torch.stack(per_class, dim=1)

    values = ((torch.arange(levels, device=device, dtype=torch.float32) + 0.5) / levels * 255).round() / 255
    grid = torch.cartesian_prod(values, values, values)  # (levels^3, 3), on uint8 levels: the scores are final
    with eval_mode(model), frozen_parameters(model):
        with torch.no_grad():
            scores = torch.cat([checked_scores(model(flat(part)), len(part), classes) for part in grid.split(chunk)])
            gains = objective(scores)  # (levels^3, K)
            best = gains.argmax(dim=0)
            colours, logits, gain = grid[best], scores[best], gains[best, rows]
        if settings.colour_steps:
            theta = torch.logit(colours, eps=1e-3).clone().requires_grad_(True)
            optimiser = torch.optim.Adam([theta], lr=0.1)
            with torch.enable_grad():
                for _ in range(settings.colour_steps):
                    own = class_objective(model(flat(torch.sigmoid(theta))), rows, target, settings.objective,
                                          head)
                    optimiser.zero_grad(set_to_none=True)
                    (-own.sum()).backward()
                    optimiser.step()
            with torch.no_grad():
                refined = (torch.sigmoid(theta) * 255).round() / 255
                refined_logits = model(flat(refined))
                better = class_objective(refined_logits, rows, target, settings.objective, head) > gain
                colours = torch.where(better[:, None], refined, colours)  # keep the grid colour if refining lost
                logits = torch.where(better[:, None], refined_logits, logits)
    logits = logits.float()
    return ColourImpression(
        classes=classes,
        colours=(colours * 255).round().to(torch.uint8).cpu(),
        logits=logits.cpu(),
        probability=head.probabilities(logits)[rows, target].cpu(),
        grid_colours=len(grid),
    )
