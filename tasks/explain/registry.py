"""The explanation methods as computed: each method of :mod:`visaudit.tasks.explain.catalogue`
(its name, title and kind, listed there) joined to what computing it takes. A ``gradient``
method carries its weight function ``(A, g) -> L`` (:mod:`visaudit.tasks.explain.cam_family`,
applied by :func:`visaudit.tasks.explain.cam.explain`); CAM, the guided and the attention
methods carry the check of what the model must offer (a linear head, ``nn.ReLU`` modules,
self-attention over a class token); the other kinds live in their own modules (``occlusion``,
``mil``, ``impressions``, ``attention_maps``).

A new CAM variant is one weight function in ``cam_family``, its entry in ``WEIGHTS`` here and
its name, title and kind in :mod:`visaudit.tasks.explain.catalogue` (no torch: the report and
the CLI read the names and titles there); the audit's method list reads this registry.
:func:`check_methods` finds, before any image is read, the methods the model cannot support:
they are skipped with a one-line note, and only a run where none applies is refused. A model
with no layer to hook (a TorchScript archive: its modules refuse hooks) gets only the methods
that need none (:attr:`Method.needs_layer` false: occlusion, MIL patches, class impressions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from visaudit.tasks.explain import cam_family
from visaudit.tasks.explain.catalogue import CATALOGUE, MethodInfo, check_method_names
from visaudit.tasks.model.attention import attention_family, captured_attention, class_token_prefix
from visaudit.tasks.model.errors import ModelError
from visaudit.tasks.model.hooks import frozen_parameters, head_features, hooked_forward, relu_modules
from visaudit.tasks.model.layout import token_grid
from visaudit.tasks.model.loading import LoadedModel

WeightFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Check = Callable[[LoadedModel, list[str], int], None]

def _probe_input(loaded: LoadedModel, count: int, size: int) -> torch.Tensor:
    """``count`` seeded noise images of ``size`` pixels a side on the model's device, for the checks' forwards."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 3, size, size, generator=generator).to(loaded.device)


def check_gradients_reach(loaded: LoadedModel, layers: list[str], size: int) -> None:
    """Gradient methods need the class scores to depend, through autograd, on each explained
    layer; a model that detaches its backbone (or runs it under no_grad) is refused early."""
    forward = hooked_forward(loaded.model, _probe_input(loaded, 1, size), layers)
    acts = [forward.activations[name] for name in layers]
    blocked = [name for name, a in zip(layers, acts) if not a.requires_grad]
    if forward.scores.requires_grad and not blocked:
        grads = torch.autograd.grad(forward.scores.sum(), acts, allow_unused=True)
        blocked = [name for name, g in zip(layers, grads) if g is None]
    elif not blocked:
        blocked = list(layers)
    if blocked:
        raise ModelError(
            f"--layer {blocked[-1]!r}: the class scores do not depend on this layer through autograd (the model "
            "detaches its output or runs it under torch.no_grad), so gradient methods cannot explain it; "
            "remove the .detach()/no_grad from the model's forward, choose a later layer with --layer, "
            "or use --methods occlusion"
        )


def check_cam_applies(loaded: LoadedModel, layers: list[str], size: int) -> None:
    """CAM needs a global-average-pool + linear head on the explained layer (the last of
    ``layers``); say so early if not."""
    layer = layers[-1]
    forward = hooked_forward(loaded.model, _probe_input(loaded, 2, size), [layer])
    if cam_family.linear_head(loaded.model, forward, layer) is None:
        raise ModelError(
            f"CAM does not apply to this model: its head on {layer!r} is not global-average-pool + linear "
            "(Grad-CAM equals CAM on such heads, so use gradcam)"
        )


def check_relu_modules(loaded: LoadedModel, layers: list[str], size: int) -> None:
    """Guided backprop gates ``nn.ReLU`` modules; a model without any (it calls ``F.relu``) is refused."""
    if not relu_modules(loaded.model):
        raise ModelError(
            "guided backprop needs nn.ReLU modules and this model has none (it may call F.relu, or use GELU)"
        )


def check_attention_applies(loaded: LoadedModel, layers: list[str], size: int) -> None:
    """Attention rollout needs global self-attention over a class token and the patch tokens
    in every block, read by an adapter (:mod:`visaudit.tasks.model.attention`), and a head
    that reads the class token alone. The last is measured: with one backward of a seeded
    random projection of the head's features, the gradient of the last block's attention
    must be zero outside the class token's row (a head on pooled patch tokens reads them all)."""
    model = loaded.model
    if attention_family(model) is None:
        raise ModelError("attention rollout needs self-attention blocks (a ViT); this model has none")
    grid = token_grid(model, (size, size)) or (0, 0)
    try:
        with captured_attention(model, gradients=True) as captured, head_features(model) as features:
            with frozen_parameters(model), torch.enable_grad():
                scores = model(_probe_input(loaded, 1, size))
        class_token_prefix(captured, grid)
    except ValueError as exc:
        raise ModelError(f"attention rollout does not apply to this model: {exc}") from None
    head = features[-1] if features else scores
    projection = torch.randn(head.shape, generator=torch.Generator().manual_seed(0)).to(head)
    last = captured.gradients((head * projection).sum())[-1].abs()
    top = float(last.amax())
    if top == 0 or float(last[:, :, 1:].amax()) > 1e-6 * top:
        raise ModelError("attention rollout does not apply to this model: its head does not read the class token "
                         "alone (measured: the last block's attention gets gradient outside the class token's row)")


@dataclass(frozen=True)
class Method(MethodInfo):
    """One explanation method (:class:`MethodInfo`) with what computing it takes: ``weights``
    for the ``gradient`` kind (only), and the ``check`` of what the model must offer beyond
    gradients reaching the layers (see :func:`check_methods`)."""

    weights: WeightFunction | None = None
    check: Check | None = None

    def __post_init__(self) -> None:
        if (self.kind == "gradient") != (self.weights is not None):
            raise ValueError(f"method {self.name!r}: a weight function goes with the 'gradient' kind, and only with it")


WEIGHTS: dict[str, WeightFunction] = {
    "gradcam": cam_family.gradcam, "gradcam++": cam_family.gradcam_pp, "xgradcam": cam_family.xgradcam,
    "layercam": cam_family.layercam, "hirescam": cam_family.hirescam, "counterfactual": cam_family.counterfactual,
}
CHECKS: dict[str, Check] = {
    "cam": check_cam_applies, "guided_backprop": check_relu_modules, "guided_gradcam": check_relu_modules,
    "attention_rollout": check_attention_applies, "gradient_rollout": check_attention_applies,
}
REGISTRY: tuple[Method, ...] = tuple(
    Method(info.name, info.title, info.kind, weights=WEIGHTS.get(info.name), check=CHECKS.get(info.name))
    for info in CATALOGUE
)
METHODS: dict[str, Method] = {method.name: method for method in REGISTRY}
GRADIENT_METHODS: dict[str, WeightFunction] = {m.name: m.weights for m in REGISTRY if m.weights is not None}


def check_methods(loaded: LoadedModel, methods: Sequence[str], layers: list[str], input_size: int) -> dict[str, str]:
    """The requested methods this model cannot support, each with its one-line note
    (name -> note, registry order); they are skipped and the run goes on with the others.

    ``layers`` are the hooked layers, shallow to deep, the explained layer last (more than
    one: the layer-by-layer Grad-CAM view). Checks, in this order: the names are known;
    the class scores depend through autograd on every layer (when a method needs gradients,
    or for the layer-by-layer view: a layer problem, fixed with ``--layer``, so an error);
    then each requested method's own check, once per check, in registry order (CAM's linear
    head, guided backprop's ``nn.ReLU`` modules): a method whose check fails is skipped.
    Unknown names raise ValueError; a model no requested method applies to, or whose
    layers the gradients do not reach, :class:`ModelError`. Without ``layers`` (a TorchScript
    model) every method that needs a layer is skipped, with ``loaded.layer_reason`` as its note.
    """
    check_method_names(methods)
    requested = [method for method in REGISTRY if method.name in set(methods)]
    if not layers:
        skipped = {m.name: f"{m.title} needs hooks on the model's layers; {loaded.layer_reason}"
                   for m in requested if m.needs_layer}
        if len(skipped) == len(requested):
            agnostic = ",".join(m.name for m in REGISTRY if not m.needs_layer)
            raise ModelError(f"none of the requested methods applies to this model: {loaded.layer_reason} "
                             f"(use --methods {agnostic})")
        return skipped
    if any(method.needs_gradients for method in requested) or len(layers) > 1:
        check_gradients_reach(loaded, layers, input_size)
    notes: dict[Check, str | None] = {}
    for check in dict.fromkeys(method.check for method in requested if method.check is not None):
        try:
            check(loaded, layers, input_size)
            notes[check] = None
        except ModelError as exc:
            notes[check] = str(exc)
    skipped = {m.name: note for m in requested if m.check is not None and (note := notes[m.check]) is not None}
    if len(skipped) == len(requested):
        raise ModelError(f"none of the requested methods applies to this model: {'; '.join(dict.fromkeys(skipped.values()))}")
    return skipped
