"""Running a model without changing it: forward hooks, frozen parameters, eval mode, and the
hooked forward every gradient explanation starts from.

Each helper is a context manager (or uses one) that restores what it changed — hooks
removed, ``requires_grad`` flags and train/eval flags put back — even when something raises.

:func:`hooked_forward` hooks the layers to explain and runs ONE forward that yields both the
class scores and the activations, so gradients can be taken with respect to those
activations only (``torch.autograd.grad``): no parameter gradients are computed or accumulated.
With ``guided=True`` it also gates every ``nn.ReLU`` for Guided Backpropagation
(Springenberg et al. 2015), so the same forward serves plain and guided gradients.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from visaudit.tasks.model.layout import Layout, from_map, infer_layout, to_map, token_grid

ForwardHook = Callable[[nn.Module, Any, Any], Any]


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, ForwardHook]]) -> Iterator[None]:
    """Register each ``(module, hook)`` forward hook, in order, for the duration; all removed afterwards."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode for the duration, then restore each module's own flag."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def head_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the input of the model's last ``nn.Linear`` (the head's features) at each forward
    in the block; the list stays empty for a model without one."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    features: list[torch.Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda _m, args: features.append(args[0])) if linears else None
    try:
        yield features
    finally:
        if handle is not None:
            handle.remove()


def relu_modules(model: nn.Module) -> list[nn.ReLU]:
    """The model's ``nn.ReLU`` modules, the ones guided backprop can gate (``F.relu`` calls are invisible)."""
    return [module for module in model.modules() if isinstance(module, nn.ReLU)]


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
    activations: dict[str, torch.Tensor]  # layer -> (N, C, h, w) map, part of the graph
    inputs: torch.Tensor | None = None  # the input leaf, when the forward was run guided
    switch: GuidedSwitch | None = None


def hooked_forward(
    model: nn.Module, inputs: torch.Tensor, layers: list[str], guided: bool = False
) -> HookedForward:
    """Run the model once, capturing the outputs of ``layers`` as differentiable activations.

    The first hooked output met during the forward is detached into a leaf that requires
    grad; later ones are already in the graph. Each output is read as a map
    (:mod:`visaudit.tasks.model.layout`: transformer tokens and channels-last outputs become
    (N, C, h, w)) and the hook hands downstream a tensor rebuilt from that map (a clone for a
    CNN map), so gradients reach the map and an in-place op after the layer
    (``ReLU(inplace=True)``) cannot alter the captured values.

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
    grid = token_grid(model, (int(inputs.shape[-2]), int(inputs.shape[-1])))

    def make_hook(name: str) -> ForwardHook:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            layout = infer_layout(output.shape, grid) or Layout("nchw", (0, 0))  # not a map: passed as is
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            acts = to_map(output, layout)
            captured[name] = acts
            return from_map(acts, output, layout)

        return hook

    switch = GuidedSwitch() if guided else None
    relus = relu_modules(model) if guided else []
    if guided:
        if not relus:
            raise ValueError(
                "guided backprop needs nn.ReLU modules; this model has none (it may call F.relu): "
                "use the gradcam family instead"
            )
        inputs = inputs.detach().requires_grad_(True)

    def gate(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return _GuidedGate.apply(output, switch)

    # Layer hooks first: a hooked ReLU is captured before its gate, so Grad-CAM sees plain values.
    hooks = [(modules[name], make_hook(name)) for name in layers] + [(relu, gate) for relu in relus]
    with forward_hooks(hooks), frozen_parameters(model), torch.enable_grad():
        scores = model(inputs)
    not_reached = [name for name in layers if name not in captured]
    if not_reached:
        raise ValueError(f"layers never ran in the forward pass: {not_reached}")
    return HookedForward(scores, captured, inputs if guided else None, switch)
