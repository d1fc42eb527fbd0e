"""Grad-CAM engine: one forward for predictions and activations, gradients on activations only.

Grad-CAM (Selvaraju et al., 2017) for class c at a layer with activations A (K channels,
h x w positions)::

    alpha_k^c = 1/(h w) * sum_ij  d y^c / d A^k_ij          (channel weights)
    L^c       = ReLU( sum_k alpha_k^c A^k )                 (h x w map)

where y^c is the class score before the softmax/sigmoid. The engine hooks the layers to
explain, runs ONE forward that yields both the class scores and the activations, and
takes the gradients of the scores with respect to those activations only
(``torch.autograd.grad``): no parameter gradients are computed or accumulated, and the
user's model is left exactly as it was (hooks removed, ``requires_grad`` restored), even
when something raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class GuidedSwitch:
    """Shared flag read by every guided gate at backward time (see :class:`_GuidedGate`)."""

    def __init__(self) -> None:
        self.on = False


class _GuidedGate(torch.autograd.Function):
    """Identity in the forward; in the backward, while ``switch.on``, the incoming gradient
    is clamped at zero. Placed after every ``nn.ReLU``, whose own backward multiplies by
    (input > 0), it turns the backward into Guided Backpropagation (Springenberg et al. 2015)::

        R_l = (f_l > 0) * (R_{l+1} > 0) * R_{l+1}

    and with the switch off it is plain backpropagation, so ONE forward serves both
    Grad-CAM (plain gradients) and guided backprop (guided gradients)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, switch: GuidedSwitch) -> torch.Tensor:
        ctx.switch = switch
        return x.clone()  # a fresh tensor: later in-place ops (ReLU(inplace), +=) stay legal

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad.clamp(min=0) if ctx.switch.on else grad), None


@dataclass
class HookedForward:
    """Class scores (with the graph back to the activations) and the hooked activations."""

    scores: torch.Tensor  # (N, K)
    activations: dict[str, torch.Tensor]  # layer -> (N, C, h, w), part of the graph
    inputs: torch.Tensor | None = None  # the input leaf, when the forward was run guided
    switch: GuidedSwitch | None = None


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter for the duration, then restore the flags.

    With frozen parameters the forward records a graph only from the first hooked
    activation onwards, so nothing before the explained layer is kept for backward.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def hooked_forward(
    model: nn.Module, inputs: torch.Tensor, layers: list[str], guided: bool = False
) -> HookedForward:
    """Run the model once, capturing the outputs of ``layers`` as differentiable activations.

    The first hooked output met during the forward is detached into a leaf that requires
    grad; later ones are already in the graph. Each hook hands a clone downstream, so an
    in-place op after the layer (``ReLU(inplace=True)``) cannot alter the captured values.

    With ``guided`` the graph starts at the input (a leaf that requires grad) and a
    :class:`_GuidedGate` follows every ``nn.ReLU`` module, off until guided backprop asks.
    Models that call ``F.relu`` instead of ``nn.ReLU`` modules cannot be guided.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("Grad-CAM needs autograd; call it outside torch.inference_mode()")
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"layers not found in the model: {missing}")
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            captured[name] = output
            return output.clone()

        return hook

    switch = GuidedSwitch() if guided else None
    if guided:
        relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
        if not relus:
            raise ValueError(
                "guided backprop needs nn.ReLU modules; this model has none (it may call F.relu): "
                "use the gradcam family instead"
            )
        inputs = inputs.detach().requires_grad_(True)

    def gate(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return _GuidedGate.apply(output, switch)

    # Layer hooks first: a hooked ReLU is captured before its gate, so Grad-CAM sees plain values.
    handles = [modules[name].register_forward_hook(make_hook(name)) for name in layers]
    if guided:
        handles += [module.register_forward_hook(gate) for module in relus]
    try:
        with frozen_parameters(model), torch.enable_grad():
            scores = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    not_reached = [name for name in layers if name not in captured]
    if not_reached:
        raise ValueError(f"layers never ran in the forward pass: {not_reached}")
    return HookedForward(scores, captured, inputs if guided else None, switch)


def target_rounds(sample: torch.Tensor) -> torch.Tensor:
    """Rank of each (image, target) pair within its image, for pairs sorted by image.

    Pairs of the same rank have at most one target per image, so one backward of the sum
    of their scores gives each image's own gradient (images are independent in eval mode).
    """
    counts = torch.bincount(sample)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sample.numel(), device=sample.device) - starts[sample]


EPS = 1e-7


def _weighted(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    return (weights[:, :, None, None] * acts).sum(dim=1)


def _gradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """alpha_k = mean_ij g_kij;  L = sum_k alpha_k A_k  (Selvaraju et al. 2017)."""
    return _weighted(g.mean(dim=(2, 3)), a)


def _gradcam_pp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018), with the exponential-score closed form:
    a_kij = g^2 / (2 g^2 + sum_ij(A_k) g^3);  alpha_k = sum_ij a_kij ReLU(g_kij)."""
    g2 = g.pow(2)
    denominator = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + 1e-6
    aij = torch.where(g != 0, g2 / denominator, torch.zeros_like(g))
    return _weighted((aij * F.relu(g)).sum(dim=(2, 3)), a)


def _xgradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): alpha_k = sum_ij (A_kij / sum_ij A_k) g_kij."""
    return _weighted((g * a).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + EPS), a)


def _layercam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): L = sum_k ReLU(g_k) * A_k, weighted per position."""
    return (F.relu(g) * a).sum(dim=1)


def _hirescam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): L = sum_k g_k * A_k, element-wise (no averaging)."""
    return (g * a).sum(dim=1)


def _counterfactual(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Counterfactual Grad-CAM (Grad-CAM paper, sec. 5): negated gradients, the regions
    whose removal would make the model MORE confident in the class."""
    return _weighted(-g.mean(dim=(2, 3)), a)


GRADIENT_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": _gradcam,
    "gradcam++": _gradcam_pp,
    "xgradcam": _xgradcam,
    "layercam": _layercam,
    "hirescam": _hirescam,
    "counterfactual": _counterfactual,
}
# Input-space methods: maps at the input's resolution, keyed (method, INPUT_LAYER) by explain().
GUIDED_METHODS = ("guided_backprop", "guided_gradcam")
INPUT_LAYER = "input"


def explain(
    forward: HookedForward,
    sample: torch.Tensor,
    target: torch.Tensor,
    methods: tuple[str, ...] = ("gradcam",),
) -> dict[tuple[str, str], torch.Tensor]:
    """Maps of every requested method at every hooked layer for (image, class) pairs.

    ``sample`` (M,) indexes images of the batch and ``target`` (M,) their classes; pairs
    must be sorted by ``sample``. Returns (method, layer) -> (M, h, w) maps, each
    ``ReLU``-ed, on the scores' device. All gradient methods share the same gradients: one
    ``autograd.grad`` per round (the most targets any image has), for all layers at once.

    Guided methods (the forward must be run with ``guided=True``) add one guided backward
    per round to the input, and are keyed at ``INPUT_LAYER``:
      guided_backprop  (M, 3, H, W)  the guided gradient of the class score w.r.t. the input
      guided_gradcam   (M, 3, H, W)  guided_backprop * Grad-CAM of the deepest hooked layer,
                                     upsampled to the input (Selvaraju et al. 2017, sec. 3.1)
    """
    known = set(GRADIENT_METHODS) | set(GUIDED_METHODS)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(sorted(known))}")
    guided = [m for m in methods if m in GUIDED_METHODS]
    if guided and (forward.inputs is None or forward.switch is None):
        raise ValueError(f"{guided} need a forward run with hooked_forward(..., guided=True)")
    layers = list(forward.activations)
    acts = [forward.activations[name] for name in layers]
    deepest = layers[-1]
    cam_methods = [m for m in methods if m in GRADIENT_METHODS]
    if "guided_gradcam" in methods and "gradcam" not in cam_methods:
        cam_methods.append("gradcam")  # needed for the product, dropped from the result below
    maps = {  # float32 whatever the activations' dtype (bf16 under autocast): maps are compared, summed, ranked
        (method, name): a.new_zeros((sample.numel(), *a.shape[2:]), dtype=torch.float32)
        for method in cam_methods
        for name, a in zip(layers, acts)
    }
    if guided:
        x = forward.inputs
        maps[("guided_backprop", INPUT_LAYER)] = x.new_zeros((sample.numel(), *x.shape[1:]), dtype=torch.float32)
    rounds = target_rounds(sample)
    n_rounds = int(rounds.max().item()) + 1 if rounds.numel() else 0
    for r in range(n_rounds):
        pick = (rounds == r).nonzero().squeeze(1)
        rows = sample[pick]
        objective = forward.scores[rows, target[pick]].sum()
        last = r == n_rounds - 1
        if cam_methods:
            grads = torch.autograd.grad(objective, acts, retain_graph=bool(guided) or not last)
            for name, a, g in zip(layers, acts, grads):
                a_rows, g_rows = a[rows].detach().float(), g[rows].float()
                for method in cam_methods:
                    maps[(method, name)][pick] = F.relu(GRADIENT_METHODS[method](a_rows, g_rows))
        if guided:
            assert forward.switch is not None and forward.inputs is not None
            forward.switch.on = True
            try:
                (g_input,) = torch.autograd.grad(objective, forward.inputs, retain_graph=not last)
            finally:
                forward.switch.on = False
            maps[("guided_backprop", INPUT_LAYER)][pick] = g_input[rows]
    if "guided_gradcam" in methods:
        backprop = maps[("guided_backprop", INPUT_LAYER)]
        size = backprop.shape[-2:]
        coarse = F.interpolate(maps[("gradcam", deepest)][:, None], size=size, mode="bilinear", align_corners=False)
        maps[("guided_gradcam", INPUT_LAYER)] = backprop * coarse
        if "guided_backprop" not in methods:
            del maps[("guided_backprop", INPUT_LAYER)]
    if "gradcam" not in methods:
        for name in layers:
            maps.pop(("gradcam", name), None)
    return maps


def grad_cam(forward: HookedForward, sample: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Grad-CAM maps, layer -> (M, h, w); see :func:`explain`."""
    return {layer: m for (_, layer), m in explain(forward, sample, target, ("gradcam",)).items()}


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


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(M, h, w) -> (M, size, size), bilinear, batched on the maps' device."""
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


@dataclass
class MapScores:
    """Per-map scores; box scores are NaN where the image has no box."""

    peak_row: torch.Tensor
    peak_col: torch.Tensor
    peak_x: torch.Tensor  # 0..1 of the input width
    peak_y: torch.Tensor
    energy_in_box: torch.Tensor
    box_area_fraction: torch.Tensor
    pointing_hit: torch.Tensor  # 1.0 / 0.0 / NaN


def score_maps(maps: torch.Tensor, boxes: torch.Tensor, input_size: int, tolerance: float = 0.0) -> MapScores:
    """Peak location, and with a box (input pixels, (M,4) x0,y0,x1,y1; NaN = none) grown by
    ``tolerance`` pixels on each side (the pointing game's tolerance, Zhang et al. 2016: a
    coarse map cannot place its mass finer than its cells):

    energy_in_box = sum of the upsampled map inside the box / its total sum
                    (a uniform map scores the box-area fraction; Score-CAM's energy pointing game)
    pointing_hit  = the upsampled map's maximum lies inside the box (pointing game)
    """
    m, h, w = maps.shape
    flat_peak = maps.reshape(m, -1).argmax(dim=1)
    peak_row, peak_col = flat_peak // w, flat_peak % w
    up = upsample(maps, input_size)
    coords = torch.arange(input_size, device=maps.device, dtype=maps.dtype) + 0.5
    has_box = ~torch.isnan(boxes).any(dim=1)
    safe = torch.nan_to_num(boxes, nan=0.0).to(maps.dtype)
    safe = (safe + torch.tensor([-tolerance, -tolerance, tolerance, tolerance], device=safe.device, dtype=safe.dtype))
    safe = safe.clamp(0, input_size)
    inside_x = (coords[None] >= safe[:, 0:1]) & (coords[None] < safe[:, 2:3])  # (M, W)
    inside_y = (coords[None] >= safe[:, 1:2]) & (coords[None] < safe[:, 3:4])  # (M, H)
    mask = inside_y[:, :, None] & inside_x[:, None, :]
    total = up.sum(dim=(1, 2))
    energy = (up * mask).sum(dim=(1, 2)) / total
    area = mask.float().mean(dim=(1, 2))
    up_peak = up.reshape(m, -1).argmax(dim=1)
    hit = mask.reshape(m, -1).gather(1, up_peak[:, None])[:, 0].float()
    nan = torch.full_like(energy, float("nan"))
    return MapScores(
        peak_row=peak_row,
        peak_col=peak_col,
        peak_x=(peak_col.float() + 0.5) / w,
        peak_y=(peak_row.float() + 0.5) / h,
        energy_in_box=torch.where(has_box & (total > 0), energy, nan),
        box_area_fraction=torch.where(has_box, area, nan),
        pointing_hit=torch.where(has_box & (total > 0), hit, nan),
    )
