"""Per-image signals for the dataset detectors, computed batched from tensors the audit already has.

- ``embedding``: the explained layer's activations averaged over space. For the usual
  global-average-pool + linear head (ResNets, the demo CNN) this is exactly the
  penultimate-layer embedding; it costs nothing, the forward already captured it.
- ``probabilities``: every class's softmax (sigmoid for multi-label) score, for confident
  learning (label errors).
- simple image properties of the model-input pixels (in [0, 1]), the candidates of the
  ``shortcut_property`` detector: mean colour per channel, brightness (mean luma,
  Y = 0.299 R + 0.587 G + 0.114 B), contrast (standard deviation of luma) and the mean
  colour of the border band (the outer 1/16 of each side).
- ``thumbnail``: the input area-resized to 8x8 RGB (uint8), for near-duplicates: a copy
  re-encoded, resized or shifted a pixel stays within an RMS difference of 0.02 of its
  original, while distinct demo images are at least 0.04 apart (measured; the penultimate
  embeddings of a small model do not separate them: distinct shapes come closer than a
  JPEG re-encode of one image).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from visaudit.tasks.data.schema import PROPERTY_COLUMNS

LUMA = (0.299, 0.587, 0.114)
BORDER_FRACTION = 1 / 16


def pooled_embedding(activation: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, C) spatial mean; (N, T, C) token activations -> (N, C) token mean."""
    if activation.ndim == 4:
        return activation.mean(dim=(2, 3))
    if activation.ndim == 3:
        return activation.mean(dim=1)
    return activation.flatten(1)


def image_properties(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, 3, H, W) uint8 model-input pixels -> property name -> (N,) float tensor."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) pixels, got shape {tuple(pixels.shape)}")
    x = pixels.float() / 255.0
    n, _, h, w = x.shape
    mean = x.mean(dim=(2, 3))
    luma = torch.einsum("nchw,c->nhw", x, torch.tensor(LUMA, device=x.device))
    band_h, band_w = max(1, round(h * BORDER_FRACTION)), max(1, round(w * BORDER_FRACTION))
    inner = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    inner[band_h : h - band_h, band_w : w - band_w] = True
    border = x[:, :, ~inner].mean(dim=2)
    return {
        "mean_r": mean[:, 0], "mean_g": mean[:, 1], "mean_b": mean[:, 2],
        "brightness": luma.reshape(n, -1).mean(dim=1),
        "contrast": luma.reshape(n, -1).std(dim=1),
        "border_r": border[:, 0], "border_g": border[:, 1], "border_b": border[:, 2],
    }


THUMBNAIL_SIDE = 8


def thumbnails(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3 * 8 * 8) uint8 area-averaged thumbnails."""
    small = F.interpolate(pixels.float(), size=(THUMBNAIL_SIDE, THUMBNAIL_SIDE), mode="area")
    return small.round().clamp(0, 255).to(torch.uint8).flatten(1)


def signal_rows(
    image_ids: np.ndarray,
    probabilities: np.ndarray,
    embeddings: np.ndarray,
    properties: dict[str, np.ndarray],
    thumbnail: np.ndarray,
) -> pd.DataFrame:
    """Rows of the ``signals`` table for one batch of readable images."""
    return pd.DataFrame(
        {
            "image_id": image_ids,
            "probabilities": list(probabilities.astype(np.float32)),
            "embedding": list(embeddings.astype(np.float32)),
            "thumbnail": list(thumbnail.astype(np.uint8)),
            **{name: properties[name].astype(np.float32) for name in PROPERTY_COLUMNS},
        }
    )
