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

where s is the model's output: probabilities (softmax, or sigmoid for multi-label models)
or logits. Each forward of a muted copy yields the scores of all K classes, so the map of
any target class (predicted, true, named, every multi-label positive) costs no extra
forward. The grid map D[n, k] (gh x gw) is what is stored; the pixel-resolution map is
Captum's: the mean drop over the windows that cover the pixel::

    A[n, k, y, x] = sum_{ij: (y,x) in w_ij} D[n, k, i, j] / #{ij: (y,x) in w_ij}

(:func:`to_pixels`; it is separable, ``A = (R D C^T) / (r c^T)`` with the row/column
coverage indicators R (H x gh), C (W x gw) and their counts r, c).

Muted copies are built per chunk of (image, window) pairs with one broadcast
``torch.where`` from separable row/column masks: no Python loop per window, and memory
bounded by the chunk, never images x windows x C x H x W at once. Forwards run under
``torch.inference_mode()``; the model is put in eval mode for the call and its
train/eval flags are restored afterwards, even when something raises.

Scores:

- :func:`spearman`: batched Spearman rank correlation (ties get their average rank),
  the Grad-CAM paper's faithfulness measure between Grad-CAM pooled to the occlusion grid
  (:func:`pool_to_grid`) and the occlusion map (:func:`faithfulness`).
- :func:`deletion_insertion`: RISE deletion and insertion AUC (Petsiuk et al. 2018).
- :func:`box_scores`: energy inside the box and pointing-game hit of occlusion maps, via
  :func:`visaudit.tasks.explain.cam.score_maps` on the positive part of the pixel-resolution map.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visaudit.tasks.explain.cam import MapScores, score_maps

BASELINES = ("zero", "mean", "blur")
OUTPUTS = ("probability", "logit")
ACTIVATIONS = ("softmax", "sigmoid")
DEFAULT_GRID = 7
# Muted copies + activations of one chunk stay under 64 MiB on the CPU: chunks that fit the
# caches run faster. Measured (2 cores, 4 images, 7x7 grid at 224 px): resnet50 6.6-7.7 s with
# chunks of 1-4 images, 10.4 s with 16, 14.2 s with 76 (the 1 GiB budget); resnet18 2.5-3.2 s
# against 4.3 s.
CPU_BUDGET_BYTES = 64 << 20
CUDA_FREE_FRACTION = 0.5  # share of the free device memory one chunk may use

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
    activation: str  # "softmax" | "sigmoid" (for probabilities)

    def maps(self, sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Grid maps of (image, class) pairs: ``drops[sample, target]``, (M, gh, gw)."""
        return self.drops[sample.to(self.drops.device), target.to(self.drops.device)]


# ----------------------------------------------------------------------------- helpers


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode for the duration, then restore each module's own flag."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _check_inputs(inputs: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a (N, C, H, W) tensor, got {shape}")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point (normalised images), got {inputs.dtype}")


def _check_output(output: str, activation: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")


def _to_scores(logits: torch.Tensor, output: str, activation: str) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"the model must return (N, K) class scores, got shape {tuple(logits.shape)}")
    if output == "logit":
        return logits.float()
    return torch.softmax(logits.float(), dim=1) if activation == "softmax" else torch.sigmoid(logits.float())


def blurred(inputs: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """A strongly Gaussian-blurred copy (sigma default min(H, W)/16 px, kernel 2*ceil(3 sigma)+1)."""
    import torchvision.transforms.functional as TF

    h, w = inputs.shape[-2:]
    sigma = float(sigma) if sigma is not None else max(min(h, w) / 16.0, 1.0)
    kernel = 2 * math.ceil(3 * sigma) + 1
    largest = 2 * min(h, w) - 1  # reflect padding needs kernel // 2 < the image side
    kernel = min(kernel, largest if largest % 2 else largest - 1)
    return TF.gaussian_blur(inputs, [kernel, kernel], [sigma, sigma])


def baseline_images(inputs: torch.Tensor, spec: OcclusionSpec) -> torch.Tensor:
    """The fill for muted pixels, broadcastable to ``inputs``: (1|N, C, 1|H, 1|W).

    zero -> 0;  mean -> per-image per-channel mean of ``inputs`` (or ``spec.mean``);
    blur -> :func:`blurred` copy of each image.
    """
    n, c = inputs.shape[:2]
    if spec.baseline == "zero":
        return inputs.new_zeros((1, c, 1, 1))
    if spec.baseline == "mean":
        if spec.mean is None:
            return inputs.mean(dim=(2, 3), keepdim=True)
        if len(spec.mean) != c:
            raise ValueError(f"mean has {len(spec.mean)} values but the inputs have {c} channels")
        return torch.tensor(spec.mean, dtype=inputs.dtype, device=inputs.device).view(1, c, 1, 1)
    return blurred(inputs, spec.blur_sigma)


def _cover(length: int, window: int, stride: int, count: int, device: torch.device) -> torch.Tensor:
    """(count, length) bool: window i covers positions [i*stride, i*stride + window)."""
    pos = torch.arange(length, device=device)
    start = torch.arange(count, device=device)[:, None] * stride
    return (pos[None] >= start) & (pos[None] < start + window)


def _take(base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of a per-image tensor, or the shared one when it has a single row."""
    return base if base.shape[0] == 1 else base[index]


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 * CPU_BUDGET_BYTES
    return int(min(CPU_BUDGET_BYTES, available // 4))


def _probe(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Forward ``x`` (one image) and measure the largest module output, in bytes per image."""
    largest = [0]

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size() // max(1, output.shape[0]))

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, largest[0]


def auto_chunk(per_image_input: int, per_image_activation: int, device: torch.device) -> int:
    """Images per forward such that muted copies plus live activations fit the budget:

    chunk * (2 * C*H*W*bytes + 4 * largest activation per image) <= budget
    (CUDA: half the free memory, torch.cuda.mem_get_info; CPU: min(64 MiB, available / 4)).
    """
    per_image = 2 * per_image_input + 4 * per_image_activation
    return max(1, _available_bytes(device) // max(1, per_image))


def _base_forward(
    model: nn.Module, inputs: torch.Tensor, chunk_size: int | None
) -> tuple[torch.Tensor, int]:
    """Logits of the unmuted images, and the chunk size to use (measured on the first image if automatic)."""
    n = inputs.shape[0]
    first, largest = _probe(model, inputs[:1]) if chunk_size is None else (None, 0)
    if chunk_size is None:
        chunk_size = auto_chunk(inputs[0].numel() * inputs.element_size(), largest, inputs.device)
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
    activation: Literal["softmax", "sigmoid"] = "softmax",
) -> OcclusionResult:
    """Drop of every class's score for every muted window of every image.

    ``inputs`` (N, C, H, W) normalised images; returns an :class:`OcclusionResult` with
    ``base_scores`` (N, K) and ``drops`` (N, K, gh, gw) (float32, on the inputs' device):
    ``drops[n, k, i, j] = s_k(x_n) - s_k(x_n with window (i, j) muted)``, with s the
    softmax/sigmoid probabilities (``output="probability"``) or the logits.

    The N * gh * gw muted copies are built and run ``chunk_size`` at a time (automatic:
    see :func:`auto_chunk`); results do not depend on the chunk size beyond float rounding.
    """
    spec = spec or OcclusionSpec()
    _check_inputs(inputs)
    _check_output(output, activation)
    _check_chunk(chunk_size)
    n, c, h, w = inputs.shape
    geo = spec.geometry((h, w))
    gh, gw = geo.grid
    count = geo.count
    device = inputs.device
    rows = _cover(h, geo.window[0], geo.stride[0], gh, device)  # (gh, H)
    cols = _cover(w, geo.window[1], geo.stride[1], gw, device)  # (gw, W)
    with eval_mode(model), torch.inference_mode():
        x = inputs.detach()
        base = baseline_images(x, spec).to(x.dtype)
        logits, chunk = _base_forward(model, x, chunk_size)
        base_scores = _to_scores(logits, output, activation)
        k = base_scores.shape[1]
        flat = torch.empty((n * count, k), dtype=torch.float32, device=device)
        total = n * count
        for start in range(0, total, chunk):
            pair = torch.arange(start, min(start + chunk, total), device=device)
            image, window = pair // count, pair % count
            mask = rows[window // gw][:, :, None] & cols[window % gw][:, None, :]  # (c, H, W)
            muted = torch.where(mask[:, None], _take(base, image), x[image])
            scores = _to_scores(model(muted), output, activation)
            flat[start : start + pair.numel()] = base_scores[image] - scores
        drops = flat.view(n, count, k).permute(0, 2, 1).reshape(n, k, gh, gw)
    return OcclusionResult(base_scores.clone(), drops.clone(), geo, spec.baseline, output, activation)


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
    r = _cover(geo.size[0], geo.window[0], geo.stride[0], geo.grid[0], device).to(grid_maps.dtype)  # (gh, H)
    col = _cover(geo.size[1], geo.window[1], geo.stride[1], geo.grid[1], device).to(grid_maps.dtype)  # (gw, W)
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


def rankdata(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along the last dim, ties given their average rank (scipy's ``rankdata``), batched."""
    order = values.argsort(dim=-1, stable=True)
    ordered = values.gather(-1, order)
    n = values.shape[-1]
    pos = torch.arange(n, device=values.device).expand_as(ordered)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]  # first element of each tie group
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=-1).values
    last_flag = torch.ones_like(new)
    last_flag[..., :-1] = new[..., 1:]  # last element of each tie group
    last = torch.where(last_flag, pos, torch.full_like(pos, n)).flip(-1).cummin(dim=-1).values.flip(-1)
    ranks_sorted = (first + last).to(torch.float64) / 2 + 1
    return torch.empty_like(ranks_sorted).scatter_(-1, order, ranks_sorted)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rho per row: Pearson correlation of the (average-tie) ranks.

    ``a``, ``b`` (M, n) or (n,); returns (M,) (or a scalar), float64; NaN where a row is constant.

    rho = sum (R_a - mean R_a)(R_b - mean R_b) / sqrt(sum (R_a - mean)^2 sum (R_b - mean)^2)
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() not in (1, 2) or a.shape[-1] < 2:
        raise ValueError(f"spearman needs (M, n) or (n,) with n >= 2, got shape {tuple(a.shape)}")
    ra = rankdata(a.detach().to(torch.float64))
    rb = rankdata(b.detach().to(torch.float64).to(a.device))
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    denominator = (ra.pow(2).sum(-1) * rb.pow(2).sum(-1)).sqrt()
    rho = (ra * rb).sum(-1) / denominator
    return torch.where(denominator > 0, rho, torch.full_like(rho, float("nan")))


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
    activation: Literal["softmax", "sigmoid"] = "softmax",
) -> DeletionInsertion:
    """RISE deletion and insertion (Petsiuk et al. 2018), batched over images and steps.

    Pixels are ranked by ``saliency`` (N, h, w), upsampled bilinearly to the input, most
    salient first (ties in raster order). At step t = 0..T the first k_t = round(t H W / T)
    pixels are
      deletion:  replaced by ``baseline`` (RISE: zero), starting from the image;
      insertion: taken from the image, starting from ``insertion_baseline`` (RISE: blur);
    and p_t = probability (or logit) of ``target[n]``. AUC = :func:`auc` of p: a faithful
    saliency gives a LOW deletion AUC and a HIGH insertion AUC. The N (T+1) x 2 perturbed
    copies run in chunks (automatic like :func:`occlusion_maps`).
    """
    _check_inputs(inputs)
    _check_output(output, activation)
    _check_chunk(chunk_size)
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
            "deletion": baseline_images(x, OcclusionSpec(baseline=baseline)).to(x.dtype),
            "insertion": baseline_images(x, OcclusionSpec(baseline=insertion_baseline)).to(x.dtype),
        }
        if chunk_size is None:
            _, largest = _probe(model, x[:1])
            chunk_size = auto_chunk(x[0].numel() * x.element_size(), largest, device)
        per_mode = n * (steps + 1)
        curves = torch.empty((2 * per_mode,), dtype=torch.float32, device=device)
        for start in range(0, 2 * per_mode, chunk_size):
            pair = torch.arange(start, min(start + chunk_size, 2 * per_mode), device=device)
            insertion = pair >= per_mode
            local = pair % per_mode
            image, step = local // (steps + 1), local % (steps + 1)
            muted = rank[image] < kept[step][:, None, None]  # (c, H, W): the first k_t pixels
            # deletion: muted -> fill; insertion: muted -> image, the rest -> fill
            take_image = torch.where(insertion[:, None, None], muted, ~muted)[:, None]
            fill = torch.where(
                insertion[:, None, None, None],
                _take(fills["insertion"], image).expand(-1, c, h, w),
                _take(fills["deletion"], image).expand(-1, c, h, w),
            )
            batch = torch.where(take_image, x[image], fill)
            scores = _to_scores(model(batch), output, activation)
            curves[start : start + pair.numel()] = scores.gather(1, target[image][:, None])[:, 0]
        deletion = curves[:per_mode].view(n, steps + 1).clone()
        insertion_curve = curves[per_mode:].view(n, steps + 1).clone()
    return DeletionInsertion(auc(deletion), auc(insertion_curve), deletion, insertion_curve)
