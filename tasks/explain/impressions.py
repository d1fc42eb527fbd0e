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
parameters are frozen (``visaudit.tasks.explain.cam.frozen_parameters``: gradients are taken w.r.t. the
images only, ``requires_grad`` flags restored), no hooks are registered, and every random
draw comes from a ``torch.Generator`` seeded with ``settings.seed`` on the CPU, so a seed
gives the same images (bit-identical on the CPU; on CUDA, ``grid_sample``'s backward uses
atomic adds and results may differ in the last bits).

:func:`colour_impressions` gives the impression at the coarsest scale: the plain colour whose
flat image raises each class most (grid search, then Adam), a probe for colour and background
shortcuts that a full impression, dominated by the shapes it tiles, may not show.

:func:`impression_cam` gives the Grad-CAM of each impression for its own class and where
that evidence sits (peak, mass centroid, offset from the centre), so that a report can note
impressions whose evidence is off-centre or pinned to a fixed position (a corner mark, a
border colour): the shortcut the model learnt, made visible.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from visaudit.tasks.explain.cam import frozen_parameters, grad_cam, hooked_forward
from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD
from visaudit.tasks.explain.occlusion import eval_mode

PARAMETERISATIONS = ("pixel", "fourier")
OBJECTIVES = ("log_odds", "logit")


@dataclass(frozen=True)
class ImpressionSettings:
    """Parameters of the optimisation, with their defaults.

    iterations      200     Adam steps (one batched forward + backward each).
    lr              0.05    Adam step size: in pixel units (pixels live in [0, 1]) for "pixel",
                            per spectrum coefficient for "fourier".
    tv_weight       10.0    lambda_TV. TV_beta is a per-pixel mean, so the weight does not
                            depend on the image size; 10 lowered the neighbour-difference energy
                            by a third on the test model at no cost in class probability. 0 = off.
    tv_beta         2.0     beta of TV_beta; Mahendran & Vedaldi found beta > 1 avoids spikes.
    l2_weight       0.0     lambda_2, a pull towards mid-grey (off by default).
    jitter          8.0     largest translation, in pixels, each way (Lucent's 8 at 224 px;
                            scale it with image_size, e.g. 2 at 32 px).
    rotation        10.0    largest rotation, in degrees, each way (Lucent's range).
    scale           (0.9, 1.1)  range of the random zoom factor, > 1 magnifies (Lucent's range).
    crop_fraction   0.9     smallest side of the random square crop, as a fraction of the image;
                            the crop is resized back to the full image (1.0 = no cropping).
    rgb_jitter      0.05    largest per-channel shift of the pixel values, each way.
    image_size      224     side S of the square impressions, the model's input size.
    init_std        None    standard deviation of the starting noise around mid-grey; None =
                            0.02 for "fourier", 0.1 for "pixel" (the better start of each, measured).
    seed            0       seeds every random draw (starting noise and transformations).
    parameterisation "fourier"  what Adam optimises: "pixel" (the pixels, clamped to [0, 1]) or
                            "fourier" (a 1/f-scaled spectrum through a sigmoid, Olah et al. 2017).
                            Measured on 32 px shapes models like the tests' (100 iterations,
                            tv_weight 10, 3 classes): over 30 seeds, fourier gave 90/90
                            impressions above 0.9 probability (lowest 0.98) against 88/90 for
                            pixel (lowest 0.002: an impression that scored high only once
                            resampled), and 20% less neighbour-difference energy (0.18 vs 0.22;
                            0.27 vs 0.36 without TV); on the tests' model, 12 seeds: both 36/36,
                            energy 0.20 vs 0.27 (those with the logit objective; with the log-odds
                            default: both 36/36, lowest 0.999 and 1.0, energy 0.18 vs 0.28; on the
                            demo model, fourier took all 4 classes above 0.93, pixel left "square"
                            at 0.45). Colour decorrelation (Lucent's ImageNet matrix)
                            converged slower and transferred worse to independently trained
                            models, so it is not offered.
    objective       "log_odds"  what is ascended for the class: "log_odds", log(p / (1 - p)), the
                            class's logit less the log-sum-exp of the others' (the logit itself for
                            multi-label models), or "logit", the raw score (the paper's).
    colour_levels   6       the colour impression (:func:`colour_impressions`) searches a grid of
                            colour_levels^3 plain colours; 0 = no colour impressions.
    colour_steps    20      Adam steps refining the best grid colour (step size 0.1 on its logit).
    """

    iterations: int = 200
    lr: float = 0.05
    tv_weight: float = 10.0
    tv_beta: float = 2.0
    l2_weight: float = 0.0
    jitter: float = 8.0
    rotation: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    crop_fraction: float = 0.9
    rgb_jitter: float = 0.05
    image_size: int = 224
    init_std: float | None = None
    seed: int = 0
    parameterisation: str = "fourier"
    objective: str = "log_odds"
    colour_levels: int = 6
    colour_steps: int = 20

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {self.iterations!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr (the Adam step size) must be positive, got {self.lr!r}")
        for name in ("tv_weight", "l2_weight", "jitter", "rotation", "rgb_jitter", "init_std"):
            value = getattr(self, name)
            if name == "init_std" and value is None:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.tv_beta, (int, float)) or not self.tv_beta >= 1:
            raise ValueError(f"tv_beta must be at least 1, got {self.tv_beta!r}")
        if self.rotation > 180:
            raise ValueError(f"rotation is in degrees each way and at most 180, got {self.rotation!r}")
        if isinstance(self.scale, list):  # from JSON or TOML: a (low, high) pair
            object.__setattr__(self, "scale", tuple(self.scale))
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be a range (low, high) with 0 < low <= high, got {self.scale!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        if self.rgb_jitter > 1:
            raise ValueError(f"rgb_jitter is a shift of pixel values in [0, 1]; at most 1, got {self.rgb_jitter!r}")
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"image_size must be an integer of at least 8 pixels, got {self.image_size!r}")
        if self.jitter >= self.image_size / 2:
            raise ValueError(f"jitter ({self.jitter} px) must be under half the image size ({self.image_size})")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {self.parameterisation!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name, top in (("colour_levels", 64), ("colour_steps", 100_000)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise ValueError(f"{name} must be an integer from 0 to {top}, got {value!r}")

    @property
    def start_std(self) -> float:
        """The starting noise's standard deviation: ``init_std``, or the parameterisation's default."""
        if self.init_std is not None:
            return float(self.init_std)
        return 0.02 if self.parameterisation == "fourier" else 0.1

    @property
    def has_geometry(self) -> bool:
        """Whether any geometric transformation is on (otherwise the resampling is skipped)."""
        return bool(self.jitter or self.rotation or self.scale != (1.0, 1.0) or self.crop_fraction < 1)

    def as_dict(self) -> dict[str, Any]:
        """The parameters as plain JSON-able values (for ``run.json`` and the table)."""
        values = asdict(self)
        values["scale"] = list(self.scale)
        return values


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
                    class_name=_name(class_names, c),
                    logit=float(self.logits[k, c]),
                    probability=float(self.probability[k]),
                    start_probability=float(self.start_probability[k]),
                    competitor_index=other,
                    competitor_name=_name(class_names, other),
                    competitor_probability=float(self.competitor_probability[k]),
                    iterations=self.iterations,
                    seed=self.seed,
                    parameters=parameters,
                )
            )
        return rows


def _name(class_names: Sequence[str] | None, index: int) -> str:
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def total_variation(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """TV_beta of each image of a (N, C, H, W) batch, as a per-pixel mean: (N,).

    TV_beta(x) = mean_{c,i,j} (dy^2 + dx^2)^(beta/2), with dy, dx the forward differences
    (the last row/column, which has no neighbour, contributes its one difference).
    """
    dy = x[:, :, 1:, :] - x[:, :, :-1, :]
    dx = x[:, :, :, 1:] - x[:, :, :, :-1]
    if beta == 2.0:  # the sum splits: no padding, no per-pixel combination (the hot path)
        return (dy.pow(2).sum(dim=(1, 2, 3)) + dx.pow(2).sum(dim=(1, 2, 3))) / x[0].numel()
    squared = F.pad(dy, (0, 0, 0, 1)).pow(2) + F.pad(dx, (0, 1, 0, 0)).pow(2)
    return (squared + 1e-8).pow(beta / 2).mean(dim=(1, 2, 3))


def _draws(settings: ImpressionSettings, k: int, generator: torch.Generator) -> torch.Tensor:
    """All transformation draws of the run, (iterations, K, 10) uniform in [0, 1), drawn up front
    on the CPU so that a seed fixes them whatever the device, and moved with a single transfer."""
    return torch.rand((settings.iterations, k, 10), generator=generator)


def affine_matrices(u: torch.Tensor, settings: ImpressionSettings) -> torch.Tensor:
    """(K, 2, 3) ``affine_grid`` matrices (output -> input, normalised coordinates) from uniform draws.

    An output point p maps to the input point  f R(theta) p / s + c + t : zoom s, rotation
    theta, crop of side f (the crop is resized to the full image) centred at c, jitter t.
    """
    size = settings.image_size
    lo, hi = settings.scale
    theta = (2 * u[:, 0] - 1) * math.radians(settings.rotation)
    zoom = lo + (hi - lo) * u[:, 1]
    frac = settings.crop_fraction + (1 - settings.crop_fraction) * u[:, 2]
    cx, cy = (2 * u[:, 3] - 1) * (1 - frac), (2 * u[:, 4] - 1) * (1 - frac)
    shift = 2 * settings.jitter / size  # pixels -> normalised units (the image spans 2)
    tx, ty = (2 * u[:, 5] - 1) * shift, (2 * u[:, 6] - 1) * shift
    a = frac / zoom
    cos, sin = torch.cos(theta) * a, torch.sin(theta) * a
    row0 = torch.stack([cos, -sin, cx + tx], dim=1)
    row1 = torch.stack([sin, cos, cy + ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def transform(x: torch.Tensor, u: torch.Tensor, settings: ImpressionSettings, mean: torch.Tensor,
              std: torch.Tensor) -> torch.Tensor:
    """Random transformation of the whole batch, then normalisation: pixels (K,3,S,S) -> model input.

    RGB shift per image and channel, normalise, then one batched affine resampling; the
    zero padding of the normalised tensor is the model's mean colour.
    """
    shift = (2 * u[:, 7:10] - 1)[:, :, None, None] * settings.rgb_jitter
    z = (x + shift.to(x.dtype) - mean) / std
    if not settings.has_geometry:
        return z
    grid = F.affine_grid(affine_matrices(u, settings).to(x.dtype), list(z.shape), align_corners=False)
    return F.grid_sample(z, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fourier_scale(size: int, device: torch.device | None = None) -> torch.Tensor:
    """(S, S//2 + 1) spectrum scale 1 / max(|f|, 1/S) of the Fourier parameterisation (Lucent's, decay 1)."""
    fy = torch.fft.fftfreq(size, device=device)[:, None]
    fx = torch.fft.rfftfreq(size, device=device)[None, :]
    return 1.0 / torch.sqrt(fy**2 + fx**2).clamp_min(1.0 / size)


class _Parameterised:
    """The optimised tensor and the pixels it stands for.

    pixel:    x = theta, clamped to [0, 1] after every step.
    fourier:  x = sigmoid( irfft2( s(f) * theta ) ), theta the (K, 3, S, S//2+1) complex spectrum
              (stored as real/imaginary pairs), s(f) = 1 / max(|f|, 1/S) (Olah et al. 2017; Lucent);
              Adam steps of equal size on every coefficient then move low frequencies most.
              theta starts at rfft2(logit(x0)) / s, so both start from the same noise image x0.
    """

    def __init__(self, start: torch.Tensor, kind: str) -> None:
        self.kind = kind
        if kind == "pixel":
            self.parameter = start.clone().requires_grad_(True)
        else:
            size = start.shape[-1]
            self.scale = fourier_scale(size, start.device)
            spectrum = torch.fft.rfft2(torch.logit(start, eps=1e-3), norm="ortho") / self.scale
            self.parameter = torch.view_as_real(spectrum).contiguous().requires_grad_(True)

    def pixels(self) -> torch.Tensor:
        if self.kind == "pixel":
            return self.parameter
        size = self.parameter.shape[-3]
        spectrum = torch.view_as_complex(self.parameter) * self.scale
        return torch.sigmoid(torch.fft.irfft2(spectrum, s=(size, size), norm="ortho"))

    def project(self) -> None:
        if self.kind == "pixel":
            self.parameter.clamp_(0, 1)


def _activation(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)


def _class_objective(scores: torch.Tensor, rows: torch.Tensor, target: torch.Tensor, objective: str,
                     multi_label: bool) -> torch.Tensor:
    """(K,) what each impression ascends: its class's log-odds, or its raw logit."""
    own = scores[rows, target]
    if objective == "logit" or multi_label or scores.shape[1] == 1:  # a sigmoid's log-odds is its logit
        return own
    others = scores.masked_fill(F.one_hot(target, scores.shape[1]).bool(), float("-inf"))
    return own - torch.logsumexp(others, dim=1)


def _check_classes(classes: Sequence[int]) -> list[int]:
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


def _stats(values: Sequence[float], name: str, device: torch.device) -> torch.Tensor:
    if len(values) != 3:
        raise ValueError(f"{name} needs three values (R, G, B), got {values!r}")
    tensor = torch.tensor([float(v) for v in values], device=device).view(1, 3, 1, 1)
    if name == "std" and (tensor <= 0).any():
        raise ValueError(f"std must be positive, got {values!r}")
    return tensor


def _placement(model: nn.Module, device: torch.device | str | None, mean: Sequence[float], std: Sequence[float],
               what: str) -> tuple[torch.device, torch.Tensor, torch.Tensor]:
    """The device to work on (default: the model's first parameter's, or the CPU) and the
    normalisation there; refuses inference mode, under which nothing can be optimised."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what} need autograd; call them outside torch.inference_mode()")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    return device, _stats(mean, "mean", device), _stats(std, "std", device)


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
    classes = _check_classes(classes)
    device, mean_t, std_t = _placement(model, device, mean, std, "class impressions")
    k, size = len(classes), settings.image_size

    generator = torch.Generator().manual_seed(settings.seed)
    start = (0.5 + settings.start_std * torch.randn((k, 3, size, size), generator=generator)).clamp_(0, 1)
    draws = _draws(settings, k, generator).to(device)
    target = torch.tensor(classes, device=device)
    rows = torch.arange(k, device=device)
    trace = torch.empty((settings.iterations, k), device=device)

    image = _Parameterised(start.to(device), settings.parameterisation)
    optimiser = torch.optim.Adam([image.parameter], lr=settings.lr)
    with eval_mode(model), frozen_parameters(model), torch.enable_grad():
        for t in range(settings.iterations):
            x = image.pixels()
            if t == 0:  # the first step sees the starting noise untransformed: its forward scores the start
                scores = _checked(model((x - mean_t) / std_t), k, classes)
                start_logits = scores.detach().float()
            else:
                scores = model(transform(x, draws[t], settings, mean_t, std_t))
            own = scores[rows, target]
            objective = _class_objective(scores, rows, target, settings.objective, multi_label)
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

    probabilities = _activation(logits, multi_label)
    start_probability = _activation(start_logits, multi_label)[rows, target]
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
    return _checked(scores, pixels.shape[0], classes).float()


def _checked(scores: torch.Tensor, n: int, classes: list[int]) -> torch.Tensor:
    """``scores`` if they are (n, C) with every requested class index below C."""
    if scores.dim() != 2 or scores.shape[0] != n:
        raise ValueError(f"the model must return (N, classes) scores, got shape {tuple(scores.shape)}")
    if max(classes) >= scores.shape[1]:
        raise ValueError(f"class index {max(classes)} out of range: the model has {scores.shape[1]} classes")
    return scores


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
    classes = _check_classes(classes)
    levels = settings.colour_levels
    if levels < 1:
        raise ValueError("colour_levels is 0: colour impressions are switched off in these settings")
    device, mean_t, std_t = _placement(model, device, mean, std, "colour impressions")
    size, k = settings.image_size, len(classes)
    rows = torch.arange(k, device=device)
    target = torch.tensor(classes, device=device)

    def flat(colours: torch.Tensor) -> torch.Tensor:
        return ((colours.view(-1, 3, 1, 1) - mean_t) / std_t).expand(-1, 3, size, size)

    def objective(scores: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N, K): every colour for every class
        n = scores.shape[0]
        per_class = [_class_objective(scores, torch.arange(n, device=device), torch.full((n,), c, device=device),
                                      settings.objective, multi_label) for c in classes]
        return torch.stack(per_class, dim=1)

    values = ((torch.arange(levels, device=device, dtype=torch.float32) + 0.5) / levels * 255).round() / 255
    grid = torch.cartesian_prod(values, values, values)  # (levels^3, 3), on uint8 levels: the scores are final
    with eval_mode(model), frozen_parameters(model):
        with torch.no_grad():
            scores = torch.cat([_checked(model(flat(part)), len(part), classes) for part in grid.split(chunk)])
            gains = objective(scores)  # (levels^3, K)
            best = gains.argmax(dim=0)
            colours, logits, gain = grid[best], scores[best], gains[best, rows]
        if settings.colour_steps:
            theta = torch.logit(colours, eps=1e-3).clone().requires_grad_(True)
            optimiser = torch.optim.Adam([theta], lr=0.1)
            with torch.enable_grad():
                for _ in range(settings.colour_steps):
                    own = _class_objective(model(flat(torch.sigmoid(theta))), rows, target, settings.objective,
                                           multi_label)
                    optimiser.zero_grad(set_to_none=True)
                    (-own.sum()).backward()
                    optimiser.step()
            with torch.no_grad():
                refined = (torch.sigmoid(theta) * 255).round() / 255
                refined_logits = model(flat(refined))
                better = _class_objective(refined_logits, rows, target, settings.objective, multi_label) > gain
                colours = torch.where(better[:, None], refined, colours)  # keep the grid colour if refining lost
                logits = torch.where(better[:, None], refined_logits, logits)
    logits = logits.float()
    return ColourImpression(
        classes=classes,
        colours=(colours * 255).round().to(torch.uint8).cpu(),
        logits=logits.cpu(),
        probability=_activation(logits, multi_label)[rows, target].cpu(),
        grid_colours=len(grid),
    )


@dataclass
class ImpressionCam:
    """Grad-CAM of each impression for its own class, and where its evidence sits.

    Positions are fractions of the width/height (0 = left/top, 1 = right/bottom); offsets
    are distances from the centre (0.5, 0.5) as a fraction of the size (at most ~0.71, a
    corner). NaN where the map is empty (no positive evidence at the layer).
    """

    layer: str
    maps: torch.Tensor  # (K, h, w) Grad-CAM at the layer's resolution
    peak_x: torch.Tensor  # (K,) centre of the map's largest cell
    peak_y: torch.Tensor
    centroid_x: torch.Tensor  # (K,) centroid of the map's part above mass_threshold x its maximum
    centroid_y: torch.Tensor
    centroid_offset: torch.Tensor  # (K,) |centroid - centre|
    peak_offset: torch.Tensor  # (K,) |peak - centre|
    spread: torch.Tensor  # (K,) RMS distance of that part from the centroid (small = one spot)
    off_centre: torch.Tensor  # (K,) bool, centroid_offset > the threshold given


def impression_cam(
    model: nn.Module,
    images: torch.Tensor,
    classes: Sequence[int],
    layer: str,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    off_centre_threshold: float = 0.25,
    mass_threshold: float = 0.5,
) -> ImpressionCam:
    """Grad-CAM (``visaudit.tasks.explain.cam``) of each impression for its class at ``layer``, and its position.

    ``images`` are the uint8 impressions (K, 3, S, S) (normalised here with ``mean``/``std``),
    or a float batch already normalised as model input. One hooked forward, one
    ``autograd.grad``; the model is left as it was (eval mode during the call, flags restored)::

        L_k = ReLU( sum_c alpha_c A^c ),  alpha_c = mean_ij d y_{c_k} / d A^c_ij
        M_k = ReLU( L_k - t max L_k )                            (t = mass_threshold)
        centroid_k = sum_ij M_k(i, j) p_ij / sum_ij M_k(i, j)    (p_ij the cell centre, in 0..1)
        spread_k = sqrt( sum_ij M_k(i, j) |p_ij - centroid_k|^2 / sum_ij M_k(i, j) )

    The centroid is taken over the map's part above ``t`` times its maximum (half by default),
    so a faint floor spread over the whole impression does not pull it to the centre.
    ``off_centre`` is ``centroid_offset > off_centre_threshold``.
    """
    classes = _check_classes(classes)
    if images.dim() != 4 or images.shape[0] != len(classes):
        raise ValueError(f"images must be (K, 3, H, W) with K = len(classes) = {len(classes)}, "
                         f"got shape {tuple(images.shape)}")
    if not 0 <= off_centre_threshold:
        raise ValueError(f"off_centre_threshold must be >= 0, got {off_centre_threshold!r}")
    if not 0 <= mass_threshold < 1:
        raise ValueError(f"mass_threshold must be in [0, 1), got {mass_threshold!r}")
    first = next(model.parameters(), None)
    device = first.device if first is not None else images.device
    images = images.to(device)
    if images.dtype == torch.uint8:
        inputs = (images.float() / 255 - _stats(mean, "mean", device)) / _stats(std, "std", device)
    else:
        inputs = images.float()
    sample = torch.arange(len(classes), device=device)
    target = torch.tensor(classes, device=device)
    with eval_mode(model):
        forward = hooked_forward(model, inputs, [layer])
        if max(classes) >= forward.scores.shape[1]:
            raise ValueError(f"class index {max(classes)} out of range: the model has "
                             f"{forward.scores.shape[1]} classes")
        maps = grad_cam(forward, sample, target)[layer].detach()
    k, h, w = maps.shape
    flat_peak = maps.reshape(k, -1).argmax(dim=1)
    peak_x = ((flat_peak % w).to(maps.dtype) + 0.5) / w
    peak_y = ((flat_peak // w).to(maps.dtype) + 0.5) / h
    ys = (torch.arange(h, device=device, dtype=maps.dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=maps.dtype) + 0.5) / w
    peak = maps.reshape(k, -1).amax(dim=1)
    mass = F.relu(maps - mass_threshold * peak[:, None, None])
    total = mass.sum(dim=(1, 2))
    safe = torch.where(total > 0, total, torch.ones_like(total))
    cy = (mass.sum(dim=2) * ys).sum(dim=1) / safe
    cx = (mass.sum(dim=1) * xs).sum(dim=1) / safe
    d2 = (ys[None, :, None] - cy[:, None, None]).pow(2) + (xs[None, None, :] - cx[:, None, None]).pow(2)
    spread = ((mass * d2).sum(dim=(1, 2)) / safe).sqrt()
    nan = torch.full_like(total, float("nan"))
    empty = peak <= 0
    cx, cy, spread = (torch.where(empty, nan, v) for v in (cx, cy, spread))
    centroid_offset = torch.hypot(cx - 0.5, cy - 0.5)
    peak_offset = torch.where(empty, nan, torch.hypot(peak_x - 0.5, peak_y - 0.5))
    return ImpressionCam(
        layer=layer,
        maps=maps,
        peak_x=torch.where(empty, nan, peak_x),
        peak_y=torch.where(empty, nan, peak_y),
        centroid_x=cx,
        centroid_y=cy,
        centroid_offset=centroid_offset,
        peak_offset=peak_offset,
        spread=spread,
        off_centre=centroid_offset > off_centre_threshold,
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"


def save_pngs(result: ImpressionResult, class_names: Sequence[str] | None, out_dir: str | Path) -> list[Path]:
    """Write one PNG per impression, ``impression_<k>_<class index>_<class name>.png``, in order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels = result.images.permute(0, 2, 3, 1).contiguous().numpy()
    paths = []
    for k, c in enumerate(result.classes):
        path = out / f"impression_{k:03d}_{c:04d}_{_slug(_name(class_names, c))}.png"
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(pixels[k]).save(tmp, format="PNG")
        tmp.replace(path)
        paths.append(path)
    return paths


def settings_for_input(image_size: int, **overrides: Any) -> ImpressionSettings:
    """Default settings for a model whose input is ``image_size`` pixels a side: the jitter
    (Lucent's 8 px at 224) scales with the size; ``overrides`` set any other parameter."""
    jitter = min(8.0 * image_size / 224, image_size / 2 - 1)
    return ImpressionSettings(**({"image_size": image_size, "jitter": round(jitter, 2)} | overrides))


def choose_classes(class_names: Sequence[str], requested: Sequence[str], cap: int,
                   counts: Mapping[str, int] | None = None) -> list[int]:
    """The class indices to synthesise: the ``requested`` names, in order; or, when none are
    named, every class up to ``cap``, the classes with most images in ``counts`` first
    (ties and absent classes in output order)."""
    if cap < 1:
        raise ValueError(f"the cap on impression classes must be at least 1, got {cap}")
    position = {name: i for i, name in enumerate(class_names)}
    if requested:
        unknown = [name for name in requested if name not in position]
        if unknown:
            raise ValueError(f"impression class(es) {unknown} are not among the model's classes "
                             f"({', '.join(list(class_names)[:8])}{', ...' if len(class_names) > 8 else ''})")
        return list(dict.fromkeys(position[name] for name in requested))
    counts = counts or {}
    order = sorted(range(len(class_names)), key=lambda i: (-counts.get(class_names[i], 0), i))
    return order[:cap]


def impression_table(result: ImpressionResult, cam: ImpressionCam, class_names: Sequence[str] | None,
                     image_paths: Sequence[str], colours: ColourImpression | None = None) -> pd.DataFrame:
    """The rows of ``tables/impressions``: scores of each impression, its PNG (relative path),
    its Grad-CAM for its class with where the evidence sits, and its colour impression (null
    columns without one)."""
    rows = pd.DataFrame(result.records(class_names))
    if colours is not None:
        if colours.classes != result.classes:
            raise ValueError(f"colour impressions are of classes {colours.classes}, the impressions of {result.classes}")
        rgb = colours.colours.numpy().astype(np.int32)
        rows = rows.assign(colour_r=rgb[:, 0], colour_g=rgb[:, 1], colour_b=rgb[:, 2],
                           colour_probability=colours.probability.float().numpy())
    else:
        rows = rows.assign(colour_r=None, colour_g=None, colour_b=None, colour_probability=np.nan)
    k, h, w = cam.maps.shape
    heat = cam.maps.float().cpu().reshape(k, h * w).numpy()
    located = {name: getattr(cam, name).float().cpu().numpy() for name in
               ("peak_x", "peak_y", "centroid_x", "centroid_y", "centroid_offset", "spread")}
    return rows.assign(
        image_path=list(image_paths),
        layer=cam.layer,
        height=h,
        width=w,
        heatmap=list(heat),
        off_centre=cam.off_centre.cpu().numpy(),
        **located,
    )
