"""Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers";
the simplification of their CVPR 2021 "Transformer Interpretability Beyond Attention
Visualization" that drops LRP).

For class c with score y^c (before the softmax), each block's attention is weighted by its
gradient, only positive contributions kept, averaged over heads, and accumulated through
the residual stream from the identity::

    Abar_l = E_h[ ReLU( dy^c/dA_l,h  *  A_l,h ) ]        R_0 = I
    R_l    = R_(l-1) + Abar_l R_(l-1)
    L_ij   = R_L[cls, k + i*w + j]        (the class token's row over the h x w patch tokens)

as in the authors' reference code (``avg_heads``, ``apply_self_attention_rules``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def gradient_rollout(probabilities: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], prefix: int,
                     grid: tuple[int, int]) -> torch.Tensor:
    """(M, h, w) maps from M (image, class) pairs' (M, heads, T, T) attention probabilities and
    the gradients of each pair's class score with respect to them, per block in execution order."""
    if not probabilities or len(probabilities) != len(gradients):
        raise ValueError("gradient rollout needs one gradient per block's attention, and at least one block")
    m, _, tokens, _ = probabilities[0].shape
    relevance = torch.eye(tokens, device=probabilities[0].device, dtype=torch.float32).expand(m, tokens, tokens)
    for attention, gradient in zip(probabilities, gradients):
        weighted = F.relu(gradient.float() * attention.detach().float()).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance[:, 0, prefix:].reshape(m, *grid)
