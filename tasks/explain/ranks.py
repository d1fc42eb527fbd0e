"""Rank statistics, batched on tensors: average-tie ranks and Spearman's rank correlation.

Used for the Grad-CAM paper's faithfulness (Grad-CAM against occlusion,
:func:`visaudit.tasks.explain.occlusion.faithfulness`) and the model-randomisation sanity
check (:mod:`visaudit.tasks.explain.sanity`).
"""

from __future__ import annotations

import torch


def rankdata(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along the last dim, ties given their average rank (scipy's ``rankdata``), batched."""
    order = values.argsort(dim=-1, stable=True)
    ordered = values.gather(-1, order)
    n = values.shape[-1]
    pos = torch.arange(n, device=values.device).expand_as(ordered)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]  # first element of each tie group
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=-1).values
    last_flag = torch.ones_like(new)
    last_flag[..., :-1] = new[..., 1:]  # last element of each tie group
    last = torch.where(last_flag, pos, torch.full_like(pos, n)).flip(-1).cummin(dim=-1).values.flip(-1)
    ranks_sorted = (first + last).to(torch.float64) / 2 + 1
    return torch.empty_like(ranks_sorted).scatter_(-1, order, ranks_sorted)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rho per row: Pearson correlation of the (average-tie) ranks.

    ``a``, ``b`` (M, n) or (n,); returns (M,) (or a scalar), float64; NaN where a row is constant.

    rho = sum (R_a - mean R_a)(R_b - mean R_b) / sqrt(sum (R_a - mean)^2 sum (R_b - mean)^2)
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() not in (1, 2) or a.shape[-1] < 2:
        raise ValueError(f"spearman needs (M, n) or (n,) with n >= 2, got shape {tuple(a.shape)}")
    ra = rankdata(a.detach().to(torch.float64))
    rb = rankdata(b.detach().to(torch.float64).to(a.device))
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    denominator = (ra.pow(2).sum(-1) * rb.pow(2).sum(-1)).sqrt()
    rho = (ra * rb).sum(-1) / denominator
    return torch.where(denominator > 0, rho, torch.full_like(rho, float("nan")))
