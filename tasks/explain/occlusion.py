"""Occlusion muting: batched sensitivity maps for every class at once, and the faithfulness
scores built on them.

Occlusion (Zeiler & Fergus 2014; Captum's ``Occlusion``). A window of ``wh x ww`` pixels
slides over the image with stride ``(sh, sw)``; window (i, j) covers the rows
``[i sh, min(i sh + wh, H))`` and the columns ``[j sw, min(j sw + ww, W))``, for
``i < gh = ceil((H - wh) / sh) + 1`` and ``j < gw = ceil((W - ww) / sw) + 1`` (the last
window is cut at the border, exactly as Captum does). With the binary window mask m_ij
and a baseline b (zero, a mean colour, or a blurred copy of the image)::

    x_ij          = x * (1 - m_ij) + b * m_ij                        (muted copy)
    D[n, k, i, j] = s_k(x_n) - s_k(x_n,ij)                           (drop, EVERY class k)

where s is the model's output: probabilities through its head (softmax, or sigmoid for
multi-label models; :class:`visaudit.tasks.model.head.Head`) or logits. Each forward of a
muted copy yields the scores of all K classes, so the map of any target class (predicted,
true, named, every multi-label positive) costs no extra forward. The grid map D[n, k]
(gh x gw) is what is stored; the pixel-resolution map is Captum's: the mean drop over the
windows that cover the pixel::

    A[n, k, y, x] = sum_{ij: (y,x) in w_ij} D[n, k, i, j] / #{ij: (y,x) in w_ij}

(:func:`to_pixels`; it is separable, ``A = (R D C^T) / (r c^T)`` with the row/column
coverage indicators R (H x gh), C (W x gw) and their counts r, c).

Muted copies are built per chunk of (image, window) pairs with one broadcast
``torch.where`` from separable row/column masks: no Python loop per window, and memory
bounded by the chunk, never images x windows x C x H x W at once. Forwards run under
``torch.inference_mode()``; the model is put in eval mode for the call and its
train/eval flags are restored afterwards, even when something raises.

Scores:

- :func:`faithfulness`: the Grad-CAM paper's faithfulness measure, the Spearman rank
  correlation (:func:`visaudit.tasks.explain.ranks.spearman`) between Grad-CAM pooled to
  the occlusion grid (:func:`pool_to_grid`) and the occlusion map.
- :func:`box_scores`: energy inside the box and pointing-game hit of occlusion maps, via
  :func:`visaudit.tasks.explain.cam.score_maps` on the positive part of the pixel-resolution map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visaudit.tasks.explain.cam import MapScores, score_maps
from visaudit.tasks.explain.perturb import (
    BASELINES,
    baseline_images,
    check_chunk,
    check_inputs,
    check_output,
    chunk_for,
    cover,
    take,
    to_scores,
)
from visaudit.tasks.explain.ranks import spearman
from visaudit.tasks.model.head import Head
from visaudit.tasks.model.hooks import eval_mode

DEFAULT_GRID = 7

Pair = tuple[int, int]


def _pair(value: int | Sequence[int] | None, name: str) -> Pair | None:
    """An int or (h, w) of positive ints -> (h, w); ValueError naming ``name`` otherwise."""
    if value is None:
        return None
    if isinstance(value, int):
        items: tuple[Any, ...] = (value, value)
    elif isinstance(value, (tuple, list)):
        items = tuple(value)
    else:
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of them, got {value!r}")
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of them, got {value!r}")
    if min(items) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return int(items[0]), int(items[1])


@dataclass(frozen=True)
class Geometry:
    """The windows resolved for one image size: window i covers [i*stride, i*stride + window)."""

    size: Pair  # (H, W)
    window: Pair
    stride: Pair
    grid: Pair  # (gh, gw)

    @property
    def count(self) -> int:
        """Windows per image: gh * gw."""
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class OcclusionSpec:
    """How to mute: window and stride in pixels, or a grid of equal non-overlapping windows.

    window, stride  pixels, an int or (h, w); stride defaults to the window (no overlap).
    grid            g or (gh, gw) windows per side when no window is given (default 7x7:
                    at 224 px, window = stride = 32); resolved as window = stride =
                    ceil(size / g), so an image size not divisible by g can give fewer windows.
    baseline        "zero" (0 in the normalised input space, Captum's default),
                    "mean" (the image's own per-channel mean, or ``mean`` if given: e.g. a
                    dataset mean, in the normalised space), or
                    "blur" (a Gaussian-blurred copy, sigma ``blur_sigma`` px, default size/16).
    """

    window: int | tuple[int, int] | None = None
    stride: int | tuple[int, int] | None = None
    grid: int | tuple[int, int] | None = None
    baseline: str = "zero"
    mean: tuple[float, ...] | None = None
    blur_sigma: float | None = None

    def __post_init__(self) -> None:
        window = _pair(self.window, "window")
        stride = _pair(self.stride, "stride")
        grid = _pair(self.grid, "grid")
        if window is not None and grid is not None:
            raise ValueError("give either window (and stride) or grid, not both")
        if window is None and stride is not None:
            raise ValueError("stride needs a window; with a grid, stride equals the window")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.mean is not None:
            if self.baseline != "mean":
                raise ValueError(f"mean is only used with baseline='mean', not {self.baseline!r}")
            if len(self.mean) == 0 or not all(math.isfinite(float(v)) for v in self.mean):
                raise ValueError(f"mean must be finite per-channel values, got {self.mean!r}")
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        if self.blur_sigma is not None and not (self.blur_sigma > 0 and math.isfinite(self.blur_sigma)):
            raise ValueError(f"blur_sigma must be a positive number of pixels, got {self.blur_sigma!r}")

    def geometry(self, size: int | Sequence[int]) -> Geometry:
        """Resolve window, stride and grid for an image of ``size`` (H or (H, W)) pixels."""
        hw = _pair(size if isinstance(size, int) else tuple(size), "size")
        assert hw is not None
        window, stride = _pair(self.window, "window"), _pair(self.stride, "stride")
        if window is None:
            grid = _pair(self.grid, "grid") or (DEFAULT_GRID, DEFAULT_GRID)
            if grid[0] > hw[0] or grid[1] > hw[1]:
                raise ValueError(f"grid {grid} has more windows than the image {hw} has pixels")
            window = (math.ceil(hw[0] / grid[0]), math.ceil(hw[1] / grid[1]))
        stride = stride or window
        if window[0] > hw[0] or window[1] > hw[1]:
            raise ValueError(f"window {window} is larger than the image {hw}")
        for d in range(2):
            if stride[d] > window[d] and window[d] < hw[d]:
                raise ValueError(
                    f"stride {stride} is larger than window {window}: pixels between windows would never be muted"
                )
        grid = tuple(math.ceil((hw[d] - window[d]) / stride[d]) + 1 for d in range(2))
        return Geometry(hw, window, stride, grid)  # type: ignore[arg-type]


@dataclass
class OcclusionResult:
    """Scores of the unmuted images and the drop of every class for every window."""

    base_scores: torch.Tensor  # (N, K)
    drops: torch.Tensor  # (N, K, gh, gw): base score - score with window (i, j) muted
    geometry: Geometry
    baseline: str
    output: str  # "probability" | "logit"
    head: Head  # softmax or sigmoid (for probabilities)

    def maps(self, sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Grid maps of (image, class) pairs: ``drops[sample, target]``, (M, gh, gw)."""
        return self.drops[sample.to(self.drops.device), target.to(self.drops.device)]


def _base_forward(
    model: nn.Module, inputs: torch.Tensor, chunk_size: int | None
) -> tuple[torch.Tensor, int]:
    """Logits of the unmuted images, and the chunk size to use (measured on the first image if automatic)."""
    n = inputs.shape[0]
    chunk_size, first = chunk_for(model, inputs, chunk_size)
    parts = [first] if first is not None else []
    for start in range(1 if first is not None else 0, n, chunk_size):
        parts.append(model(inputs[start : start + chunk_size]))
    return torch.cat(parts), chunk_size


# ----------------------------------------------------------------------------- occlusion


def occlusion_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    spec: OcclusionSpec | None = None,
    chunk_size: int | None = None,
    output: Literal["probability", "logit"] = "probability",
    head: Head = Head(multi_label=False),
) -> OcclusionResult:
    """Drop of every class's score for every muted window of every image.

    ``inputs`` (N, C, H, W) normalised images; returns an :class:`OcclusionResult` with
    ``base_scores`` (N, K) and ``drops`` (N, K, gh, gw) (float32, on the inputs' device):
    ``drops[n, k, i, j] = s_k(x_n) - s_k(x_n with window (i, j) muted)``, with s the
    probabilities through ``head`` (``output="probability"``: softmax, or sigmoid for a
    multi-label model) or the logits.

    The N * gh * gw muted copies are built and run ``chunk_size`` at a time (automatic:
    see :func:`visaudit.tasks.explain.perturb.chunk_for`); results do not depend on the chunk
    size beyond float rounding.
    """
    spec = spec or OcclusionSpec()
    check_inputs(inputs)
    check_output(output, head)
    check_chunk(chunk_size)
    n, c, h, w = inputs.shape
    geo = spec.geometry((h, w))
    gh, gw = geo.grid
    count = geo.count
    device = inputs.device
    rows = cover(h, geo.window[0], geo.stride[0], gh, device)  # (gh, H)
    cols = cover(w, geo.window[1], geo.stride[1], gw, device)  # (gw, W)
    with eval_mode(model), torch.inference_mode():
        x = inputs.detach()
        base = baseline_images(x, spec.baseline, spec.mean, spec.blur_sigma).to(x.dtype)
        logits, chunk = _base_forward(model, x, chunk_size)
        base_scores = to_scores(logits, output, head)
        k = base_scores.shape[1]
        flat = torch.empty((n * count, k), dtype=torch.float32, device=device)
        total = n * count
        for start in range(0, total, chunk):
            pair = torch.arange(start, min(start + chunk, total), device=device)
            image, window = pair // count, pair % count
            mask = rows[window // gw][:, :, None] & cols[window % gw][:, None, :]  # (c, H, W)
            muted = torch.where(mask[:, None], take(base, image), x[image])
            scores = to_scores(model(muted), output, head)
            flat[start : start + pair.numel()] = base_scores[image] - scores
        drops = flat.view(n, count, k).permute(0, 2, 1).reshape(n, k, gh, gw)
    return OcclusionResult(base_scores.clone(), drops.clone(), geo, spec.baseline, output, head)


def to_pixels(
    maps: OcclusionResult | torch.Tensor, spec: OcclusionSpec | None = None, size: int | Sequence[int] | None = None
) -> torch.Tensor:
    """Captum-equivalent per-pixel attributions: the mean drop of the windows covering each pixel.

    ``A[..., y, x] = sum_{ij covers (y,x)} D[..., i, j] / #{ij covers (y,x)}``

    ``maps`` is an :class:`OcclusionResult` (-> (N, K, H, W); mind the size for many
    classes) or grid maps (..., gh, gw) such as ``result.maps(sample, target)`` (->
    (..., H, W)). ``spec`` and ``size`` give the geometry; for a result they default to
    the result's own and must agree with it.
    """
    if isinstance(maps, OcclusionResult):
        geo = maps.geometry
        if spec is not None or size is not None:
            other = (spec or OcclusionSpec()).geometry(size if size is not None else geo.size)
            if other != geo:
                raise ValueError(f"spec/size give windows {other}, but the result was computed with {geo}")
        grid_maps = maps.drops
    else:
        if size is None:
            raise ValueError("size (the input's H or (H, W)) is needed to place grid maps in pixels")
        geo = (spec or OcclusionSpec()).geometry(size)
        grid_maps = maps
    if tuple(grid_maps.shape[-2:]) != geo.grid:
        raise ValueError(f"maps have a {tuple(grid_maps.shape[-2:])} grid, the spec gives {geo.grid}")
    device = grid_maps.device
    r = cover(geo.size[0], geo.window[0], geo.stride[0], geo.grid[0], device).to(grid_maps.dtype)  # (gh, H)
    col = cover(geo.size[1], geo.window[1], geo.stride[1], geo.grid[1], device).to(grid_maps.dtype)  # (gw, W)
    summed = torch.einsum("iy,...ij,jx->...yx", r, grid_maps, col)
    counts = r.sum(0)[:, None] * col.sum(0)[None, :]
    return summed / counts


# ----------------------------------------------------------------------------- scores


def pool_to_grid(cam_maps: torch.Tensor, grid: int | Sequence[int]) -> torch.Tensor:
    """(M, h, w) maps -> (M, gh, gw) by adaptive average pooling (Grad-CAM onto the occlusion grid)."""
    if cam_maps.dim() != 3:
        raise ValueError(f"cam_maps must be (M, h, w), got shape {tuple(cam_maps.shape)}")
    size = _pair(grid if isinstance(grid, int) else tuple(grid), "grid")
    return F.adaptive_avg_pool2d(cam_maps[:, None].float(), size)[:, 0]


def faithfulness(cam_maps: torch.Tensor, occlusion_grid_maps: torch.Tensor) -> torch.Tensor:
    """The Grad-CAM paper's faithfulness: Spearman rho between Grad-CAM pooled to the
    occlusion grid and the occlusion map, per (image, target) pair; (M, h, w), (M, gh, gw) -> (M,)."""
    if occlusion_grid_maps.dim() != 3 or cam_maps.shape[0] != occlusion_grid_maps.shape[0]:
        raise ValueError(
            f"need (M, h, w) CAM maps and (M, gh, gw) occlusion maps, got {tuple(cam_maps.shape)} "
            f"and {tuple(occlusion_grid_maps.shape)}"
        )
    pooled = pool_to_grid(cam_maps, occlusion_grid_maps.shape[-2:])
    return spearman(pooled.flatten(1), occlusion_grid_maps.flatten(1).to(pooled.device))


def box_scores(
    grid_maps: torch.Tensor, boxes: torch.Tensor, input_size: int, spec: OcclusionSpec | None = None
) -> MapScores:
    """Energy inside the box and pointing-game hit of occlusion maps (M, gh, gw), boxes (M, 4)
    in input pixels (NaN = none): :func:`visaudit.tasks.explain.cam.score_maps` on the positive part of the
    pixel-resolution map ``ReLU(to_pixels(maps))`` (a negative drop is not evidence for the class).
    Peak row/col are in input pixels."""
    pixels = to_pixels(grid_maps, spec, input_size).clamp(min=0)
    return score_maps(pixels, boxes.to(pixels.device), input_size)
