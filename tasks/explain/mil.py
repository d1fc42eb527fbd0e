"""Multiple-instance patch maps (``mil_patches``): every patch of the image classified on its own.

Tamboli's survey (sec. II.C), after Patil et al. 2019 (attention-based multiple-instance
learning on histopathology): gradient maps spread over the whole image where the evidence is
texture, so the image is cut into patches, each patch is classified by the model alone, and
the patch confidences, placed back on the image, form the map. Model-agnostic: no gradients,
no layer.

Geometry, as fractions of the input side (so one default fits 32..224 px inputs): patch side
``p = max(1, round(patch * H))`` and stride ``s = max(1, round(stride * H))`` (likewise with W).
Patch i starts at ``min(i s, H - p)`` for ``i < g = ceil((H - p) / s) + 1``: the last patch is
moved back to end at the border instead of being cut, so every patch has the full size and
every pixel is covered (s <= p). Each patch is resized (bilinear, as torchvision's ``resize``;
a patch is never larger than the input, so there is nothing to antialias) to the input size
H x W and classified::

    P[n, k, i, j] = s_k(resize(x_n[:, rows_i, cols_j]))           (EVERY class k)

with s the model's output: probabilities through its head (softmax, or sigmoid for multi-label
models; :class:`visaudit.tasks.model.head.Head`) or logits. One forward of a patch yields all
K classes, so any target's map costs no extra forward. The pixel map averages the patches that
cover each pixel (overlapping patches averaged)::

    A[n, k, y, x] = sum_{ij: (y,x) in patch ij} P[n, k, i, j] / #{ij: (y,x) in patch ij}

It is separable, ``A = (R / r)^T P (C / c)`` with the row/column coverage indicators R
(gh x H), C (gw x W) and their counts r, c (:func:`to_pixels`). The stored map is A averaged
over the cells of a ``ceil(H / s) x ceil(W / s)`` grid (adaptive average pooling; exact when
s divides H and p, as with the defaults at sides divisible by 8): a table row stays small.

Patches are cut per chunk of (image, patch) pairs by one gather of their row and column
indices and resized by one batched ``F.interpolate``: no Python loop per image or per patch,
and memory bounded by the chunk. Forwards run under ``torch.inference_mode()`` with the
model in eval mode; its train/eval flags are restored afterwards, even when something raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visaudit.tasks.explain.perturb import check_chunk, check_inputs, check_output, chunk_for, to_scores
from visaudit.tasks.model.head import Head
from visaudit.tasks.model.hooks import eval_mode

Pair = tuple[int, int]


def _starts(length: int, patch: int, stride: int) -> tuple[int, ...]:
    """Patch starts along one side: 0, s, 2s, ... and the last moved back to end at ``length``."""
    count = math.ceil((length - patch) / stride) + 1
    return tuple(min(i * stride, length - patch) for i in range(count))


@dataclass(frozen=True)
class MilGeometry:
    """The patches resolved for one input size: patch (i, j) covers rows [row_starts[i],
    row_starts[i] + patch[0]) and columns [col_starts[j], col_starts[j] + patch[1])."""

    size: Pair  # (H, W)
    patch: Pair
    stride: Pair
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]

    @property
    def grid(self) -> Pair:
        """Patches per side: (gh, gw)."""
        return len(self.row_starts), len(self.col_starts)

    @property
    def count(self) -> int:
        """Patches per image: gh * gw."""
        return len(self.row_starts) * len(self.col_starts)

    @property
    def cells(self) -> Pair:
        """The stored map's grid: ceil(H / s) x ceil(W / s) cells."""
        return math.ceil(self.size[0] / self.stride[0]), math.ceil(self.size[1] / self.stride[1])

    def coverage(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(gh, H) and (gw, W) bool: which rows / columns each patch covers."""
        out = []
        for starts, patch, length in ((self.row_starts, self.patch[0], self.size[0]),
                                      (self.col_starts, self.patch[1], self.size[1])):
            pos = torch.arange(length, device=device)
            first = torch.tensor(starts, device=device)[:, None]
            out.append((pos[None] >= first) & (pos[None] < first + patch))
        return out[0], out[1]


@dataclass(frozen=True)
class MilSpec:
    """Patch side and stride as fractions of the input side (0 < stride <= patch <= 1).

    The defaults, patch 0.25 and stride 0.125, give 7 x 7 half-overlapping patches at any
    input size divisible by 8 (56 px patches, stride 28, at 224 px; 8 px, stride 4, at 32 px).
    """

    patch: float = 0.25
    stride: float = 0.125

    def __post_init__(self) -> None:
        for name in ("patch", "stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"mil_patches {name} must be a fraction of the input side in (0, 1], got {value!r}")
        if self.stride > self.patch:
            raise ValueError(f"mil_patches stride {self.stride} is larger than the patch {self.patch}: "
                             "pixels between patches would never be classified")

    def geometry(self, size: int | Sequence[int]) -> MilGeometry:
        """Resolve patch, stride and starts for an input of ``size`` (H or (H, W)) pixels."""
        hw = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        patch = tuple(max(1, round(self.patch * side)) for side in hw)
        stride = tuple(min(p, max(1, round(self.stride * side))) for p, side in zip(patch, hw))
        return MilGeometry(hw, patch, stride, _starts(hw[0], patch[0], stride[0]),  # type: ignore[arg-type]
                           _starts(hw[1], patch[1], stride[1]))


@dataclass
class MilResult:
    """Every class's score for every patch of every image."""

    scores: torch.Tensor  # (N, K, gh, gw)
    geometry: MilGeometry
    output: str  # "probability" | "logit"
    head: Head

    def maps(self, sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Patch-score grids of (image, class) pairs: ``scores[sample, target]``, (M, gh, gw)."""
        return self.scores[sample.to(self.scores.device), target.to(self.scores.device)]


def patch_batch(inputs: torch.Tensor, geometry: MilGeometry, pair: torch.Tensor) -> torch.Tensor:
    """The patches of flat (image, patch) indices ``pair`` (image = pair // count), each
    resized to the input size: (len(pair), C, H, W), by one gather and one interpolate."""
    device = inputs.device
    gw = geometry.grid[1]
    image, patch = pair // geometry.count, pair % geometry.count
    rows = torch.tensor(geometry.row_starts, device=device)[patch // gw, None] + torch.arange(
        geometry.patch[0], device=device)  # (c, ph)
    cols = torch.tensor(geometry.col_starts, device=device)[patch % gw, None] + torch.arange(
        geometry.patch[1], device=device)  # (c, pw)
    crops = inputs[image[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (c, ph, pw, C)
    crops = crops.permute(0, 3, 1, 2).contiguous()
    if tuple(crops.shape[-2:]) == geometry.size:
        return crops
    # a patch is never larger than the input: upsampling, where antialiasing changes nothing (and costs 2x)
    return F.interpolate(crops, size=geometry.size, mode="bilinear", align_corners=False)


def mil_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    spec: MilSpec | None = None,
    chunk_size: int | None = None,
    output: Literal["probability", "logit"] = "probability",
    head: Head = Head(multi_label=False),
) -> MilResult:
    """Every class's score for every patch of every image, as a :class:`MilResult` with
    ``scores`` (N, K, gh, gw), float32 on the inputs' device.

    ``inputs`` (N, C, H, W) normalised images. The N * gh * gw patches are cut, resized and
    classified ``chunk_size`` at a time (automatic: see
    :func:`visaudit.tasks.explain.perturb.chunk_for`); results do not depend on the chunk size
    beyond float rounding.
    """
    spec = spec or MilSpec()
    check_inputs(inputs)
    check_output(output, head)
    check_chunk(chunk_size)
    n, _c, h, w = inputs.shape
    geo = spec.geometry((h, w))
    gh, gw = geo.grid
    total = n * geo.count
    with eval_mode(model), torch.inference_mode():
        x = inputs.detach()
        # an automatic chunk size is measured on the first patch, whose scores are kept
        chunk, first = chunk_for(model, patch_batch(x, geo, torch.arange(1, device=x.device)), chunk_size)
        parts = [to_scores(first, output, head)] if first is not None else []
        for start in range(len(parts), total, chunk):
            pair = torch.arange(start, min(start + chunk, total), device=x.device)
            parts.append(to_scores(model(patch_batch(x, geo, pair)), output, head))
        flat = torch.cat(parts)  # (N * gh * gw, K)
        scores = flat.view(n, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
    return MilResult(scores.clone(), geo, output, head)


def to_pixels(grid_maps: torch.Tensor, geometry: MilGeometry) -> torch.Tensor:
    """(..., gh, gw) patch scores -> (..., H, W): the mean score of the patches covering each pixel,
    ``A = (R / r)^T P (C / c)``."""
    if tuple(grid_maps.shape[-2:]) != geometry.grid:
        raise ValueError(f"maps have a {tuple(grid_maps.shape[-2:])} grid, the geometry gives {geometry.grid}")
    rows, cols = geometry.coverage(grid_maps.device)
    r = rows.to(grid_maps.dtype)
    c = cols.to(grid_maps.dtype)
    return torch.einsum("iy,...ij,jx->...yx", r / r.sum(0), grid_maps, c / c.sum(0))


def stored_maps(grid_maps: torch.Tensor, geometry: MilGeometry) -> torch.Tensor:
    """(M, gh, gw) patch scores -> (M, ch, cw) stored maps: the pixel map averaged over the
    cells of :attr:`MilGeometry.cells` (adaptive average pooling)."""
    if grid_maps.dim() != 3:
        raise ValueError(f"grid_maps must be (M, gh, gw), got shape {tuple(grid_maps.shape)}")
    pixels = to_pixels(grid_maps.float(), geometry)
    return F.adaptive_avg_pool2d(pixels[:, None], geometry.cells)[:, 0]
