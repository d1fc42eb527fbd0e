"""Transformer-native maps from the attention captured during the audit's forward
(:func:`visaudit.tasks.model.attention.captured_attention`): attention rollout
(:mod:`~visaudit.tasks.explain.attention_rollout`) and gradient-weighted rollout
(:mod:`~visaudit.tasks.explain.gradient_rollout`), on the patch grid, keyed at
:data:`~visaudit.tasks.explain.catalogue.ATTENTION_LAYER`.

Gradient-weighted rollout takes one ``autograd.grad`` per round of targets (as the CAM
family does, :func:`visaudit.tasks.explain.cam.target_rounds`) with respect to every block's
attention at once, and keeps the graph, so the CAM family can use the same forward after it.
"""

from __future__ import annotations

import torch

from visaudit.tasks.explain.attention_rollout import attention_rollout
from visaudit.tasks.explain.cam import target_rounds
from visaudit.tasks.explain.catalogue import ATTENTION_LAYER, ATTENTION_METHODS
from visaudit.tasks.explain.gradient_rollout import gradient_rollout
from visaudit.tasks.model.attention import CapturedAttention, class_token_prefix


def attention_maps(captured: CapturedAttention, scores: torch.Tensor, sample: torch.Tensor, target: torch.Tensor,
                   methods: tuple[str, ...], grid: tuple[int, int]) -> dict[tuple[str, str], torch.Tensor]:
    """(method, ATTENTION_LAYER) -> (M, h, w) float32 maps for the (image, class) pairs
    ``sample``/``target`` (sorted by image) of the requested attention ``methods``.
    ``scores`` are the class scores of the same forward (gradient rollout differentiates them)."""
    unknown = [m for m in methods if m not in ATTENTION_METHODS]
    if unknown:
        raise ValueError(f"not attention methods: {unknown}")
    prefix = class_token_prefix(captured, grid)
    maps: dict[tuple[str, str], torch.Tensor] = {}
    if "attention_rollout" in methods:
        maps[("attention_rollout", ATTENTION_LAYER)] = attention_rollout(captured.probabilities, prefix, grid)[sample]
    if "gradient_rollout" in methods:
        out = scores.new_zeros((sample.numel(), *grid), dtype=torch.float32)
        rounds = target_rounds(sample)
        for r in range(int(rounds.max().item()) + 1 if rounds.numel() else 0):
            pick = (rounds == r).nonzero().squeeze(1)
            rows = sample[pick]
            grads = captured.gradients(scores[rows, target[pick]].sum())
            out[pick] = gradient_rollout([p[rows] for p in captured.probabilities], [g[rows] for g in grads],
                                         prefix, grid)
        maps[("gradient_rollout", ATTENTION_LAYER)] = out
    return maps
