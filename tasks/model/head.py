"""The model's head: how its class scores become probabilities, chosen in one place.

A multi-class model's classes compete (softmax); a multi-label model's classes are each
present or not (sigmoid)::

    softmax:  p_k = exp(y_k) / sum_j exp(y_j)
    sigmoid:  p_k = 1 / (1 + exp(-y_k))

with y the class scores (logits) the model returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class Head:
    """Softmax (``multi_label=False``) or sigmoid (``multi_label=True``) over the class scores."""

    multi_label: bool

    def __post_init__(self) -> None:
        if not isinstance(self.multi_label, bool):
            raise TypeError(f"multi_label must be a bool, got {type(self.multi_label).__name__}")

    @property
    def name(self) -> Literal["softmax", "sigmoid"]:
        """``"sigmoid"`` for a multi-label model, ``"softmax"`` otherwise."""
        return "sigmoid" if self.multi_label else "softmax"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K) class scores -> (N, K) float32 probabilities: softmax over dim 1, or the sigmoid."""
        if logits.dim() != 2:
            raise ValueError(f"the head needs (N, K) class scores, got shape {tuple(logits.shape)}")
        scores = logits.float()
        return torch.sigmoid(scores) if self.multi_label else torch.softmax(scores, dim=1)
