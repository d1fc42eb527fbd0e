"""How a module's output becomes an (N, C, h, w) map: CNN maps as they are, transformer
tokens and channels-last outputs reshaped.

Three layouts are read (inputs are square crops, so a CNN map has h == w):

- ``nchw``    (N, C, h, w), h == w: a convolutional map, used as is (with a patch grid of
              g x g, a square of side >= g*g is an attention matrix (N, heads, T, T), no map);
- ``nhwc``    (N, h, w, C), h == w != C: channels-last (Swin stages, ConvNeXt block
              internals), permuted to (N, C, h, w);
- ``tokens``  (N, k + h*w, C): a transformer's tokens, ``k`` leading class / distillation /
              register tokens dropped and the h*w patch tokens laid out on the patch grid.
              The grid is the input size over the patch size, the patch size being the
              stride of the model's patch embedding (its first ``Conv2d`` whose kernel equals
              its stride); ``k = T - h*w`` must be between 0 and :data:`MAX_PREFIX_TOKENS`.

:func:`to_map` and :func:`from_map` are inverse on the patch part, so a hook can hand
downstream a tensor computed FROM the map: gradients then reach the map itself, as they do
with pytorch-grad-cam's ``reshape_transform`` (the dropped tokens' gradients are not part
of any map).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

MAX_PREFIX_TOKENS = 16  # class + distillation + up to 14 register tokens

LayoutKind = Literal["nchw", "nhwc", "tokens"]


@dataclass(frozen=True)
class Layout:
    """Where the map lies in a module's output: the kind, the dropped leading tokens, the grid."""

    kind: LayoutKind
    grid: tuple[int, int]
    prefix: int = 0


def patch_embedding(model: nn.Module) -> nn.Conv2d | None:
    """The patch embedding: the first ``Conv2d`` (module order) with kernel == stride > 1, or None."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == module.stride and module.stride[0] > 1:
            return module
    return None


def patch_size(model: nn.Module) -> int | None:
    """The stride of the patch embedding (:func:`patch_embedding`), or None without one."""
    embedding = patch_embedding(model)
    return None if embedding is None else int(embedding.stride[0])


def token_grid(model: nn.Module, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The patch grid (H // p, W // p) for an input of ``input_hw`` pixels, or None without a patch embedding."""
    size = patch_size(model)
    return None if size is None else (input_hw[0] // size, input_hw[1] // size)


def infer_layout(shape: tuple[int, ...] | torch.Size, grid: tuple[int, int] | None) -> Layout | None:
    """The layout of an output of ``shape`` (see the module docstring), or None when it is no map."""
    if len(shape) == 4:
        _, a, h, w = (int(v) for v in shape)
        if h == w:
            if grid is not None and h >= max(grid[0] * grid[1], 2):  # (N, heads, T, T): attention, not a map
                return None
            return Layout("nchw", (h, w))
        if a == h:  # (N, h, w, C) with w == h: channels-last
            return Layout("nhwc", (a, h))
        return None  # a square input gives square maps; window partitions and the like are not maps
    if len(shape) == 3 and grid is not None:
        prefix = int(shape[1]) - grid[0] * grid[1]
        if 0 <= prefix <= MAX_PREFIX_TOKENS and grid[0] * grid[1] > 0:
            return Layout("tokens", grid, prefix)
    return None


def to_map(output: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The (N, C, h, w) map of an output in ``layout``::

        nhwc:    A[n, c, i, j] = X[n, i, j, c]
        tokens:  A[n, c, i, j] = X[n, k + i*w + j, c]
    """
    if layout.kind == "nchw":
        return output
    if layout.kind == "nhwc":
        return output.permute(0, 3, 1, 2)
    h, w = layout.grid
    return output[:, layout.prefix:].reshape(output.shape[0], h, w, output.shape[2]).permute(0, 3, 1, 2)


def from_map(acts: torch.Tensor, output: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The module output rebuilt from its map (inverse of :func:`to_map`), the dropped
    tokens taken from ``output``: what a hook hands downstream so gradients reach ``acts``."""
    if layout.kind == "nchw":
        return acts.clone()  # a fresh tensor: later in-place ops (ReLU(inplace), +=) stay legal
    channels_last = acts.permute(0, 2, 3, 1)
    if layout.kind == "nhwc":
        return channels_last.contiguous()
    patches = channels_last.reshape(acts.shape[0], -1, acts.shape[1])
    return torch.cat([output[:, : layout.prefix], patches], dim=1)
