"""Layer choice: which module's output a map explains.

:func:`probe` runs one dummy forward and records the spatial size of every module's 4-D
output, in execution order; :func:`default_layer` picks the last conv stage from it,
:func:`stage_layers` the stages of the layer-by-layer view, and :func:`check_layer`
refuses a named layer that is missing or not spatial, with the names it could have meant.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from visaudit.tasks.model.errors import ModelError
from visaudit.tasks.model.hooks import ForwardHook, forward_hooks

_POOLING = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d,
)


def probe(model: nn.Module, device: torch.device, size: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Run one dummy forward; return the spatial output size of every module with a 4-D
    output (in execution order) and the number of classes (the output width)."""
    shapes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> ForwardHook:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                shapes.pop(name, None)  # re-insert so the order is execution order
                shapes[name] = (int(output.shape[2]), int(output.shape[3]))

        return hook

    with forward_hooks((module, record(name)) for name, module in model.named_modules() if name):
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, 3, size, size, device=device))
        except Exception as exc:
            raise ModelError(f"the model failed on a {size}x{size} input ({type(exc).__name__}: {exc})") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the model must return class scores of shape (batch, classes); it returned {shape}")
    return shapes, int(out.shape[1])


def _spatial(layer_shapes: dict[str, tuple[int, int]], model: nn.Module) -> list[str]:
    """Modules with a spatial (h w > 1) output, pooling aside, in execution order: the candidate stages."""
    modules = dict(model.named_modules())
    return [name for name, (h, w) in layer_shapes.items() if h * w > 1 and not isinstance(modules[name], _POOLING)]


def default_layer(layer_shapes: dict[str, tuple[int, int]], model: nn.Module) -> str:
    """The last module (in execution order) with a spatial output, pooling aside: the last conv stage.

    When a container and its last child emit the same output, the container's hook fires
    last, so ``layer4`` (resnet) or ``features`` (vgg, densenet, mobilenet) is chosen;
    a pooling head such as VGG's 7x7 ``avgpool`` is not a stage.
    """
    spatial = _spatial(layer_shapes, model)
    if not spatial:
        raise ModelError("no layer with a spatial output found; name one with --layer")
    return spatial[-1]


def stage_layers(layer_shapes: dict[str, tuple[int, int]], model: nn.Module, count: int = 4) -> list[str]:
    """The backbone's stages for the layer-by-layer view: for each spatial resolution, the last
    module (pooling aside) that outputs it, keeping the ``count`` deepest, shallow to deep.

    ResNets give ``layer1..layer4``; VGG, DenseNet and MobileNet give the last module of each
    resolution inside ``features``.
    """
    last_at: dict[tuple[int, int], str] = {}
    for name in _spatial(layer_shapes, model):
        last_at.pop(layer_shapes[name], None)
        last_at[layer_shapes[name]] = name
    return list(last_at.values())[-count:]


def check_layer(model: nn.Module, layer: str, layer_shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse a named ``--layer`` that is not a module of the model, or whose output is not a spatial map."""
    names = dict(model.named_modules())
    if layer not in names:
        close = difflib.get_close_matches(layer, list(layer_shapes), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"--layer {layer!r}: no such module in the model{hint}")
    h, w = layer_shapes.get(layer, (0, 0))
    if h * w <= 1:
        raise ModelError(
            f"--layer {layer!r}: its output is not a spatial (N,C,H,W) map, so it cannot be explained; "
            f"spatial layers include {', '.join([n for n, s in layer_shapes.items() if s[0] * s[1] > 1][-3:])}"
        )
