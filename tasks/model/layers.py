"""Layer choice: which module's output a map explains, and why.

:func:`probe` runs one dummy forward and records the :class:`~visaudit.tasks.model.layout.Layout`
of every module whose output is a map (a CNN's (N, C, h, w), a channels-last (N, h, w, C),
a transformer's (N, k + h*w, C) tokens), in execution order. :func:`choose_layer` picks the
explained layer with its reason:

- the last module with a spatial map (pooling and modules that only reshape or drop out
  aside): the last conv stage of a CNN (``layer4``, ``features``), the final norm of a
  channels-last model (Swin), the last stage of ConvNeXt;
- for a token model, the deepest token output whose PATCH tokens still reach the class
  scores, measured by one backward: in a class-token ViT only the class token goes to the
  head after the last block's attention, so every later patch token has zero gradient;
  of those that reach it the deepest LayerNorm is taken (not an attention projection):
  the last block's first LayerNorm (``ln_1``, ``norm1``,
  ``layernorm_before``), the layer pytorch-grad-cam documents for ViT
  (``model.blocks[-1].norm1``). A mean-pooled token model keeps its last token output.

:func:`stage_layers` gives the layer-by-layer view (one layer per resolution on a CNN, one
per block on a transformer), :func:`sanity_stages` the sanity check's cascade (the blocks
themselves on a transformer) and :func:`check_layer` refuses a named layer that is missing
or not a map, with the names it could have meant.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visaudit.tasks.model.errors import ModelError
from visaudit.tasks.model.hooks import ForwardHook, eval_mode, forward_hooks, head_features, hooked_forward
from visaudit.tasks.model.layout import Layout, infer_layout, token_grid

_POOLING = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d,
)
_NO_OP = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Unflatten, nn.Softmax)


def _no_op(module: nn.Module) -> bool:
    """A module that only reshapes, drops or normalises: not a layer to explain. torchvision's
    ``Permute`` (ConvNeXt, Swin) counts; it is looked up among the loaded modules, not imported
    (importing torchvision costs seconds, and a model holding one has loaded it already)."""
    misc = sys.modules.get("torchvision.ops.misc")
    return isinstance(module, _NO_OP) or (misc is not None and isinstance(module, misc.Permute))


@dataclass(frozen=True)
class Probe:
    """What one dummy forward showed: each map-like module's layout (execution order) and the class count."""

    layouts: dict[str, Layout]
    num_classes: int

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module -> the (h, w) of its map."""
        return {name: layout.grid for name, layout in self.layouts.items()}


@dataclass(frozen=True)
class LayerChoice:
    """The explained layer and the one-line reason it was chosen (recorded in run.json and the report)."""

    name: str
    reason: str


def probe(model: nn.Module, device: torch.device, size: int) -> Probe:
    """Run one dummy ``size`` x ``size`` forward; record every module's map layout and the class count."""
    layouts: dict[str, Layout] = {}
    grid = token_grid(model, (size, size))

    def record(name: str) -> ForwardHook:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and (layout := infer_layout(output.shape, grid)) is not None:
                layouts.pop(name, None)  # re-insert so the order is execution order
                layouts[name] = layout

        return hook

    hookable = ((module, record(name)) for name, module in model.named_modules()
                if name and not isinstance(module, torch.jit.ScriptModule))  # a TorchScript module refuses hooks
    with forward_hooks(hookable):
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, 3, size, size, device=device))
        except Exception as exc:
            raise ModelError(f"the model failed on a {size}x{size} input ({type(exc).__name__}: {exc})") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the model must return class scores of shape (batch, classes); it returned {shape}")
    return Probe(layouts, int(out.shape[1]))


def _spatial(layer_shapes: dict[str, tuple[int, int]], model: nn.Module) -> list[str]:
    """Modules with a spatial (h w > 1) map, pooling and no-op modules aside, in execution order."""
    modules = dict(model.named_modules())
    return [name for name, (h, w) in layer_shapes.items()
            if h * w > 1 and not isinstance(modules[name], _POOLING) and not _no_op(modules[name])]


def default_layer(layer_shapes: dict[str, tuple[int, int]], model: nn.Module) -> str:
    """The last module (in execution order) with a spatial map, pooling and no-op modules aside.

    When a container and its last child emit the same output, the container's hook fires
    last, so ``layer4`` (resnet) or ``features`` (vgg, densenet, mobilenet) is chosen;
    a pooling head such as VGG's 7x7 ``avgpool`` is not a stage, nor Swin's final ``permute``.
    """
    spatial = _spatial(layer_shapes, model)
    if not spatial:
        raise ModelError("no layer with a spatial output found; name one with --layer")
    return spatial[-1]


def choose_layer(model: nn.Module, found: Probe, device: torch.device, size: int) -> LayerChoice:
    """The explained layer and its reason (see the module docstring)."""
    last = default_layer(found.shapes, model)
    layout = found.layouts[last]
    if layout.kind == "nchw":
        return LayerChoice(last, "the last module with a spatial map before the pooled head (the last conv stage)")
    if layout.kind == "nhwc":
        return LayerChoice(last, "the last spatial map before the pooled head; its channels-last "
                                 "(N, H, W, C) output is permuted to (N, C, H, W)")
    tokens = [n for n in _spatial(found.shapes, model) if found.layouts[n].kind == "tokens"]
    reached = _reaching_patch_tokens(model, tokens, device, size)
    if not reached:
        raise ModelError("no token layer whose patch tokens reach the class scores was found; name one with --layer")
    modules = dict(model.named_modules())
    norms = [name for name in reached if isinstance(modules[name], nn.LayerNorm)]
    choice, prefix = (norms or reached)[-1], layout.prefix
    if choice == last:
        return LayerChoice(choice, f"the last token output; {prefix} leading token(s) dropped, "
                                   f"the {layout.grid[0]}x{layout.grid[1]} patch tokens laid out as a map")
    return LayerChoice(choice, f"the deepest token layer whose patch tokens still reach the class scores "
                               f"(measured: every later one, e.g. {last!r}, gets zero gradient, only the "
                               f"class token goes on to the head); {prefix} leading token(s) dropped")


def _reaching_patch_tokens(model: nn.Module, layers: list[str], device: torch.device, size: int) -> list[str]:
    """The ``layers`` whose maps reach the classifier: non-zero gradient of a seeded random
    projection of the last ``nn.Linear``'s input (the head's features; the class scores when
    there is no linear head), for one noise image and one backward. The head's input, not
    its output, is measured, so a zero-initialised head (torchvision's ViT) does not hide it."""
    if not layers:
        return []
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1, 3, size, size, generator=generator).to(device)
    with head_features(model) as features, eval_mode(model):
        forward = hooked_forward(model, inputs, layers)
    head_input = features[-1] if features else forward.scores
    projection = torch.randn(head_input.shape, generator=generator).to(head_input)
    acts = [forward.activations[name] for name in layers]
    grads = torch.autograd.grad((head_input * projection).sum(), acts, allow_unused=True)
    sizes = [0.0 if g is None else float(g.abs().amax()) for g in grads]
    top = max(sizes, default=0.0)
    return [name for name, s in zip(layers, sizes) if top > 0 and s > 1e-6 * top]


def stage_layers(layer_shapes: dict[str, tuple[int, int]], model: nn.Module, count: int = 4,
                 layer: str | None = None) -> list[str]:
    """The layers of the layer-by-layer view, shallow to deep, the ``count`` deepest.

    A CNN: for each spatial resolution, the last module (pooling aside) that outputs it
    (``layer1..layer4`` on a ResNet; the last module of each resolution inside VGG's,
    DenseNet's or MobileNet's ``features``). A transformer, whose blocks share one
    resolution: the same module as ``layer`` in each block (``blocks.8.norm1`` ...
    ``blocks.11.norm1``), found by its name with the block index free.
    """
    if layer is not None and (blocks := _same_layer_per_block(layer_shapes, model, layer)):
        return blocks[-count:]
    last_at: dict[tuple[int, int], str] = {}
    for name in _spatial(layer_shapes, model):
        last_at.pop(layer_shapes[name], None)
        last_at[layer_shapes[name]] = name
    return list(last_at.values())[-count:]


def _same_layer_per_block(layer_shapes: dict[str, tuple[int, int]], model: nn.Module, layer: str) -> list[str]:
    """``layer``'s counterparts in the other blocks, when they all share its resolution (a
    transformer): its name with ONE digit run free, the run that matches the most modules."""
    return [sibling for sibling, _ in _per_block(layer_shapes, model, layer)]


def _per_block(layer_shapes: dict[str, tuple[int, int]], model: nn.Module, layer: str) -> list[tuple[str, str]]:
    """(counterpart of ``layer``, the block holding it) per block, shallow to deep: the block
    is the name up to the free digit run (``blocks.11.norm1`` -> ``blocks.11``)."""
    spatial = _spatial(layer_shapes, model)
    best: list[tuple[str, str]] = []
    for run in re.finditer(r"\d+", layer):
        head, tail = layer[: run.start()], layer[run.end():]
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")
        siblings = [(name, name[: len(name) - len(tail)]) for name in spatial if pattern.match(name)]
        if len(siblings) > len(best) and all(layer_shapes[n] == layer_shapes[layer] for n, _ in siblings):
            best = siblings
    return best if len(best) > 1 else []


def sanity_stages(layer_shapes: dict[str, tuple[int, int]], model: nn.Module, layer: str, count: int = 4) -> list[str]:
    """The modules the sanity check's cascade randomises below the classifier, shallow to deep,
    the ``count`` deepest: on a transformer whose blocks share one resolution, the blocks
    themselves (``blocks.8`` .. ``blocks.11``: the explained layer's block and those below);
    otherwise one stage per resolution (:func:`stage_layers`)."""
    modules = dict(model.named_modules())
    blocks = [block for _, block in _per_block(layer_shapes, model, layer) if block in modules]
    return blocks[-count:] if len(blocks) > 1 else stage_layers(layer_shapes, model, count)


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
            f"--layer {layer!r}: its output is not a spatial map ((N,C,H,W), (N,H,W,C) or patch tokens), "
            f"so it cannot be explained; spatial layers include "
            f"{', '.join([n for n, s in layer_shapes.items() if s[0] * s[1] > 1][-3:])}"
        )
