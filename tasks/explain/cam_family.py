"""The CAM family: how each method weighs a layer's activations into a map.

For class c at a layer with activations A (K channels, h x w positions) and the gradients
g = d y^c / d A of the class score y^c (before the softmax/sigmoid), each gradient method
is ONE function ``(A, g) -> L`` of the (M, K, h, w) activations and gradients of M
(image, class) pairs, returning the (M, h, w) map before the final ReLU (applied by
:func:`visaudit.tasks.explain.cam.explain`). A new variant is one function here and one
entry in :mod:`visaudit.tasks.explain.registry`.

CAM (Zhou et al. 2016) needs no gradients: its weights are those of the model's
global-average-pool + linear head (:func:`linear_head`, :func:`class_activation_maps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visaudit.tasks.model.hooks import HookedForward

EPS = 1e-7


def _weighted(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """sum_k w_k A_k: (M, K) channel weights and (M, K, h, w) activations -> (M, h, w)."""
    return (weights[:, :, None, None] * acts).sum(dim=1)


def gradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """alpha_k = mean_ij g_kij;  L = sum_k alpha_k A_k  (Selvaraju et al. 2017)."""
    return _weighted(g.mean(dim=(2, 3)), a)


def gradcam_pp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018), with the exponential-score closed form:
    a_kij = g^2 / (2 g^2 + sum_ij(A_k) g^3);  alpha_k = sum_ij a_kij ReLU(g_kij)."""
    g2 = g.pow(2)
    denominator = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + 1e-6
    aij = torch.where(g != 0, g2 / denominator, torch.zeros_like(g))
    return _weighted((aij * F.relu(g)).sum(dim=(2, 3)), a)


def xgradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): alpha_k = sum_ij (A_kij / sum_ij A_k) g_kij."""
    return _weighted((g * a).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + EPS), a)


def layercam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): L = sum_k ReLU(g_k) * A_k, weighted per position."""
    return (F.relu(g) * a).sum(dim=1)


def hirescam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): L = sum_k g_k * A_k, element-wise (no averaging)."""
    return (g * a).sum(dim=1)


def counterfactual(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Counterfactual Grad-CAM (Grad-CAM paper, sec. 5): negated gradients, the regions
    whose removal would make the model MORE confident in the class."""
    return _weighted(-g.mean(dim=(2, 3)), a)


def linear_head(model: nn.Module, forward: HookedForward, layer: str) -> torch.Tensor | None:
    """The (K, C) weights of a global-average-pool + linear head on ``layer``, if the model has one.

    Checked numerically on the batch at hand: scores == W mean_ij(A) + b for some
    ``nn.Linear``. Models with anything else between the layer and the classifier
    (DenseNet's final ReLU, VGG's MLP) have no such head, and CAM does not apply to them.
    """
    acts = forward.activations[layer].detach()
    pooled = acts.mean(dim=(2, 3))
    scores = forward.scores.detach()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.shape == (scores.shape[1], pooled.shape[1]):
            predicted = F.linear(pooled, module.weight, module.bias)
            if torch.allclose(predicted, scores, rtol=1e-3, atol=1e-4 * scores.abs().max().item()):
                return module.weight.detach()
    return None


def class_activation_maps(acts: torch.Tensor, weights: torch.Tensor, sample: torch.Tensor,
                          target: torch.Tensor) -> torch.Tensor:
    """CAM (Zhou et al. 2016): L = ReLU(sum_k w_k^c A_k) with the linear head's weights; no gradients."""
    return F.relu(torch.einsum("mc,mchw->mhw", weights[target].float(), acts.detach()[sample].float()))
