"""Guided maps as stored: the input-space gradients of guided backprop reduced to one small saliency map.

Guided Backpropagation and Guided Grad-CAM (:func:`visaudit.tasks.explain.cam.explain`)
give a (3, H, W) gradient per (image, class) pair; what the tables keep, and what the
sanity check compares, is its per-pixel magnitude, average-pooled by an integer factor
s = ceil(max(H, W) / GUIDED_STORED_SIZE)::

    S(y, x) = mean over the s x s cell of  max_c |g_c(y', x')|
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GUIDED_STORED_SIZE = 56  # guided maps are stored pooled to at most this many pixels a side


def guided_saliency(gradients: torch.Tensor) -> torch.Tensor:
    """(M, 3, H, W) input gradients -> (M, h, w) stored map: max_c |g_c| per pixel, average-pooled
    to at most GUIDED_STORED_SIZE a side, so a table row stays small (56x56 floats at 224 px)."""
    saliency = gradients.abs().amax(dim=1, keepdim=True)
    h, w = saliency.shape[-2:]
    scale = max(1, -(-max(h, w) // GUIDED_STORED_SIZE))
    return F.avg_pool2d(saliency, scale, ceil_mode=True)[:, 0] if scale > 1 else saliency[:, 0]
