"""Class impressions: what the model has learnt for each class, synthesised from noise.

Saliency-driven class impressions (Addepalli, Tamboli, Babu & Banerjee, ICIP 2020, as
described in Tamboli's survey): start from seeded noise and update the image by gradient
ascent on the logit of the class, with random transformations between iterations so that
the image must survive them, and a Total Variation prior (Mahendran & Vedaldi 2015) for
the smoothness natural images have. For the K requested classes c_1..c_K the K images
x_k in [0, 1]^(3 x S x S) (pixel space) are optimised TOGETHER, one batch, one forward and
one backward per iteration::

    maximise  J_k(x_k) = o_{c_k}( n( T_t,k(x_k) ) )  -  lambda_TV * TV_beta(x_k)
                                                      -  lambda_2  * mean((x_k - 1/2)^2)

    o_c(z) = log( p_c / (1 - p_c) ) = y_c(z) - log sum_{j != c} exp y_j(z)
             (for a multi-label model, whose p_c is a sigmoid, o_c = y_c)

    TV_beta(x) = mean_{c,i,j} ( (x_{c,i+1,j} - x_{c,i,j})^2 + (x_{c,i,j+1} - x_{c,i,j})^2 )^(beta/2)

where y_c is the model's class score before the softmax/sigmoid (the paper ascends y_c
itself: ``objective="logit"``; the default ascends its log-odds, because a raw logit can grow
while a competitor's grows faster: on the demo model, ascending the logit left the "square"
impression at probability 0.000 and "triangle" at 0.013, the log-odds took all four above
0.93; the log-probability, log p_c, also succeeds there but stops pushing once p_c nears 1,
and on the tests' shapes model left 1 of 36 impressions under 0.9 where the log-odds left
none), n(x) = (x - mean) / std
the model's normalisation, and T_t,k a fresh random transformation at iteration t for
image k: a per-channel RGB shift, then ONE affine resampling (``F.affine_grid`` +
``F.grid_sample`` for the whole batch) that composes the random crop (a square of side f S,
f in [crop_fraction, 1], resized to S), the rotation, the scale and the jitter
(translation); what falls outside the image is the model's mean colour. T_0 is the identity,
so that the first step's forward also scores the starting noise (no extra forward). The sum over k of
J_k is maximised with Adam, either on a Fourier parameterisation (the default)::

    x_k = sigmoid( irfft2( s(f) * theta_k ) ),   s(f) = 1 / max(|f|, 1/S)

(Olah et al. 2017, Lucent; equal Adam steps on every coefficient move low frequencies most)
or on the pixels themselves (x_k = theta_k, clamped to [0, 1] after every step). Both start
from the same seeded noise x_k^0 = 0.5 + sigma N(0, 1). In eval mode the images do not
interact, so each image receives exactly its own gradient, and Adam's per-element moments
keep the K optimisations independent: the batch costs one forward and one backward of K
images per iteration.

The model is put in eval mode for the call (each module's flag restored afterwards), its
parameters are frozen (:func:`visaudit.tasks.model.hooks.frozen_parameters`: gradients are
taken w.r.t. the images only, ``requires_grad`` flags restored), no hooks are registered, and every random
draw comes from a ``torch.Generator`` seeded with ``settings.seed`` on the CPU, so a seed
gives the same images (bit-identical on the CPU; on CUDA, ``grid_sample``'s backward uses
atomic adds and results may differ in the last bits).

:func:`visaudit.tasks.explain.colour_impressions.colour_impressions` gives the impression at
the coarsest scale: the plain colour whose flat image raises each class most (grid search,
then Adam), a probe for colour and background shortcuts that a full impression, dominated by
the shapes it tiles, may not show.

:func:`visaudit.tasks.explain.impression_output.impression_cam` gives the Grad-CAM of each
impression for its own class and where that evidence sits (peak, mass centroid, offset from
the centre), so that a report can note impressions whose evidence is off-centre or pinned to
a fixed position (a corner mark, a border colour): the shortcut the model learnt, made visible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD
from visaudit.tasks.explain.impression_image import Parameterised, total_variation, transform, transform_draws
from visaudit.tasks.explain.impression_settings import ImpressionSettings
from visaudit.tasks.model.head import Head
from visaudit.tasks.model.hooks import eval_mode, frozen_parameters


@dataclass
class ImpressionResult:
    """K impressions, one per requested class, and how the model scores them.

    The scores are the model's on the returned uint8 images, untransformed (re-normalised
    exactly as a PNG of them would be), in eval mode.
    """

    classes: list[int]  # K requested classes, in order
    images: torch.Tensor  # (K, 3, S, S) uint8, pixel space, on the CPU
    logits: torch.Tensor  # (K, C) float, every class's score of each impression
    probabilities: torch.Tensor  # (K, C) softmax (or sigmoid for multi-label models) of the logits
    probability: torch.Tensor  # (K,) probability of each impression's own class
    start_probability: torch.Tensor  # (K,) the same for the starting noise
    competitor: torch.Tensor  # (K,) long, the most probable OTHER class (-1 if the model has one output)
    competitor_probability: torch.Tensor  # (K,)
    trace: torch.Tensor  # (iterations, K) own-class logit of the transformed batch per iteration
    iterations: int
    settings: ImpressionSettings
    seed: int
    multi_label: bool = False
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def records(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One plain dict per impression (the rows of ``tables/impressions``, less the image path)."""
        parameters = json.dumps(self.settings.as_dict(), sort_keys=True)
        rows = []
        for k, c in enumerate(self.classes):
            other = int(self.competitor[k])
            rows.append(
                dict(
                    class_index=c,
                    class_name=class_name(class_names, c),
                    logit=float(self.logits[k, c]),
                    probability=float(self.probability[k]),
                    start_probability=float(self.start_probability[k]),
                    competitor_index=other,
                    competitor_name=class_name(class_names, other),
                    competitor_probability=float(self.competitor_probability[k]),
                    iterations=self.iterations,
                    seed=self.seed,
                    parameters=parameters,
                )
            )
        return rows


def class_name(class_names: Sequence[str] | None, index: int) -> str:
    """The class's name when ``class_names`` has it, else its index as text."""
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def class_objective(scores: torch.Tensor, rows: torch.Tensor, target: torch.Tensor, objective: str,
                    head: Head) -> torch.Tensor:
    """(K,) what each impression ascends: its class's log-odds, or its raw logit."""
    own = scores[rows, target]
    if objective == "logit" or head.multi_label or scores.shape[1] == 1:  # a sigmoid's log-odds is its logit
        return own
    others = scores.masked_fill(F.one_hot(target, scores.shape[1]).bool(), float("-inf"))
    return own - torch.logsumexp(others, dim=1)


def check_classes(classes: Sequence[int]) -> list[int]:
    """The requested class indices as ints; ValueError for none, a non-integer or a negative index."""
    if isinstance(classes, torch.Tensor):
        classes = classes.tolist()
    classes = list(classes)
    if not classes:
        raise ValueError("classes is empty: name at least one class to synthesise")
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in classes):
        raise ValueError(f"classes must be integer class indices, got {classes!r}")
    if min(classes) < 0:
        raise ValueError(f"class indices must be >= 0, got {classes!r}")
    return [int(c) for c in classes]


def normalisation(values: Sequence[float], name: str, device: torch.device) -> torch.Tensor:
    """The (1, 3, 1, 1) ``mean`` or ``std`` (``name``) of the model's normalisation on ``device``; checked."""
    if len(values) != 3:
        raise ValueError(f"{name} needs three values (R, G, B), got {values!r}")
    tensor = torch.tensor([float(v) for v in values], device=device).view(1, 3, 1, 1)
    if name == "std" and (tensor <= 0).any():
        raise ValueError(f"std must be positive, got {values!r}")
    return tensor


def placement(model: nn.Module, device: torch.device | str | None, mean: Sequence[float], std: Sequence[float],
              what: str) -> tuple[torch.device, torch.Tensor, torch.Tensor]:
    """The device to work on (default: the model's first parameter's, or the CPU) and the
    normalisation there; refuses inference mode, under which nothing can be optimised."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what} need autograd; call them outside torch.inference_mode()")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    return device, normalisation(mean, "mean", device), normalisation(std, "std", device)


def class_impressions(
    model: nn.Module,
    classes: Sequence[int],
    settings: ImpressionSettings | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: torch.device | str | None = None,
    *,
    multi_label: bool = False,
) -> ImpressionResult:
    """Class impressions of ``classes``, optimised together as one batch (see the module docstring).

    ``model`` must already be on ``device`` (default: the device of its first parameter, or
    the CPU) and take (K, 3, S, S) inputs normalised with ``mean``/``std``; it is left exactly
    as it was. ``multi_label`` reports sigmoid probabilities instead of the softmax.
    """
    settings = ImpressionSettings() if settings is None else settings
    if not isinstance(settings, ImpressionSettings):
        raise ValueError(f"settings must be an ImpressionSettings, got {type(settings).__name__}")
    classes = check_classes(classes)
    device, mean_t, std_t = placement(model, device, mean, std, "class impressions")
    head = Head(multi_label)
    k, size = len(classes), settings.image_size

    generator = torch.Generator().manual_seed(settings.seed)
    start = (0.5 + settings.start_std * torch.randn((k, 3, size, size), generator=generator)).clamp_(0, 1)
    draws = transform_draws(settings, k, generator).to(device)
    target = torch.tensor(classes, device=device)
    rows = torch.arange(k, device=device)
    trace = torch.empty((settings.iterations, k), device=device)

    image = Parameterised(start.to(device), settings.parameterisation)
    optimiser = torch.optim.Adam([image.parameter], lr=settings.lr)
    with eval_mode(model), frozen_parameters(model), torch.enable_grad():
        for t in range(settings.iterations):
            x = image.pixels()
            if t == 0:  # the first step sees the starting noise untransformed: its forward scores the start
                scores = checked_scores(model((x - mean_t) / std_t), k, classes)
                start_logits = scores.detach().float()
            else:
                scores = model(transform(x, draws[t], settings, mean_t, std_t))
            own = scores[rows, target]
            objective = class_objective(scores, rows, target, settings.objective, head)
            if settings.tv_weight:
                objective = objective - settings.tv_weight * total_variation(x, settings.tv_beta)
            if settings.l2_weight:
                objective = objective - settings.l2_weight * (x - 0.5).pow(2).mean(dim=(1, 2, 3))
            optimiser.zero_grad(set_to_none=True)
            (-objective.sum()).backward()
            optimiser.step()
            with torch.no_grad():
                image.project()
                trace[t] = own.detach()
        with torch.no_grad():
            images = (image.pixels() * 255).round().to(torch.uint8)
        logits = _scores(model, images.float() / 255, mean_t, std_t, classes)

    probabilities = head.probabilities(logits)
    start_probability = head.probabilities(start_logits)[rows, target]
    if probabilities.shape[1] > 1:
        others = probabilities.clone()
        others[rows, target] = -1.0
        competitor_probability, competitor = others.max(dim=1)
    else:  # a single-output model has no other class
        competitor = torch.full((k,), -1, dtype=torch.long, device=device)
        competitor_probability = torch.full((k,), float("nan"), device=device)
    return ImpressionResult(
        classes=classes,
        images=images.cpu(),
        logits=logits.cpu(),
        probabilities=probabilities.cpu(),
        probability=probabilities[rows, target].cpu(),
        start_probability=start_probability.cpu(),
        competitor=competitor.cpu(),
        competitor_probability=competitor_probability.cpu(),
        trace=trace.cpu(),
        iterations=settings.iterations,
        settings=settings,
        seed=settings.seed,
        multi_label=multi_label,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )


def _scores(model: nn.Module, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
            classes: list[int]) -> torch.Tensor:
    """The model's scores of untransformed pixel images, without a graph; checks the class indices."""
    with torch.no_grad():
        scores = model((pixels - mean) / std)
    return checked_scores(scores, pixels.shape[0], classes).float()


def checked_scores(scores: torch.Tensor, n: int, classes: list[int]) -> torch.Tensor:
    """``scores`` if they are (n, C) with every requested class index below C."""
    if scores.dim() != 2 or scores.shape[0] != n:
        raise ValueError(f"the model must return (N, classes) scores, got shape {tuple(scores.shape)}")
    if max(classes) >= scores.shape[1]:
        raise ValueError(f"class index {max(classes)} out of range: the model has {scores.shape[1]} classes")
    return scores
