"""A model that takes its colour channels in BGR order, seen as one that takes RGB.

What synthesises images for a model (class and colour impressions) works in RGB, the order
the images are saved and shown in. A BGR model (``--channels bgr``) is wrapped so that it
takes RGB: with ``x`` in RGB and the model's mean and std ``m``, ``s`` in its own (BGR)
order, ``flip`` reversing the channels,

    model( flip( (x - flip(m)) / flip(s) ) ) = model( (flip(x) - m) / s )

so the wrapper is fed ``x`` normalised with the reversed mean and std, and the model sees
exactly what the audit's own preprocessing feeds it (``visaudit.tasks.data.batches.normalise``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BgrInput(nn.Module):
    """``model`` fed its input's channels reversed (RGB in, BGR to the model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.flip(1))


def rgb_view(model: nn.Module, mean: Sequence[float], std: Sequence[float],
             channels: str) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """The model, mean and std to synthesise RGB images with, for a model taking ``channels``
    (``rgb``: as they are; ``bgr``: wrapped, mean and std reversed)."""
    if channels == "rgb":
        return model, tuple(mean), tuple(std)
    if channels != "bgr":
        raise ValueError(f"channels must be rgb or bgr, got {channels!r}")
    return BgrInput(model), tuple(mean)[::-1], tuple(std)[::-1]
