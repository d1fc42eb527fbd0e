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
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

PROPERTY_COLUMNS = (
    "mean_r", "mean_g", "mean_b", "brightness", "contrast", "border_r", "border_g", "border_b",
)
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


def signal_rows(
    image_ids: np.ndarray, probabilities: np.ndarray, embeddings: np.ndarray, properties: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Rows of the ``signals`` table for one batch of readable images."""
    return pd.DataFrame(
        {
            "image_id": image_ids,
            "probabilities": list(probabilities.astype(np.float32)),
            "embedding": list(embeddings.astype(np.float32)),
            **{name: properties[name].astype(np.float32) for name in PROPERTY_COLUMNS},
        }
    )
