"""Attention rollout (Abnar & Zuidema, ACL 2020, "Quantifying Attention Flow in Transformers").

The attention of each block is averaged over its heads, the residual connection is
accounted for by adding the identity, rows are renormalised, and the blocks are multiplied
through, the last block on the left::

    Abar_l = 1/H sum_h A_l,h              Ahat_l = (Abar_l + I) / rowsum(Abar_l + I)
    R      = Ahat_L Ahat_(L-1) ... Ahat_1
    L_ij   = R[cls, k + i*w + j]          (the class token's row over the h x w patch tokens)

with ``k`` leading (class, distillation, register) tokens, the class token first. The map
does not depend on the class explained: every target of an image gets the same map.
"""

from __future__ import annotations

from typing import Sequence

import torch


def attention_rollout(probabilities: Sequence[torch.Tensor], prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) rollout maps from the blocks' (N, heads, T, T) attention probabilities (execution order)."""
    if not probabilities:
        raise ValueError("attention rollout needs the attention of at least one block")
    n, _, tokens, _ = probabilities[0].shape
    eye = torch.eye(tokens, device=probabilities[0].device, dtype=torch.float32)
    rollout = eye.expand(n, tokens, tokens)
    for attention in probabilities:
        mixed = attention.detach().float().mean(dim=1) + eye
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    return rollout[:, 0, prefix:].reshape(n, *grid)
