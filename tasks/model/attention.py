"""The attention probabilities of every self-attention block, captured during the model's own forward.

Attention rollout and its gradient-weighted variant (:mod:`visaudit.tasks.explain.attention_maps`)
need, per block l, the probabilities ``A_l = softmax(q k^T / sqrt(d))`` of shape
(N, heads, T, T) that the model multiplies with its values. Each family exposes them
differently, so one small adapter per family hooks them; all hooks and switched settings
are restored in ``finally``:

- torchvision (any ``nn.MultiheadAttention``, as in ``vit_b_16``): its callers pass
  ``need_weights=False``; a forward pre-hook asks for ``need_weights=True,
  average_attn_weights=False`` and the forward hook takes the per-head weights it then
  returns. They are a view of the softmax output the module multiplied with V (its
  ``_base``), which is what gradients are taken of.
- timm (``Attention`` modules with ``fused_attn``): the fused SDPA kernel exposes no
  probabilities, so the module's explicit path is switched on for the call (``fused_attn =
  False``) and the output of its ``attn_drop`` (the identity in eval mode) is taken: the
  ``softmax(q k^T * scale)`` after its q/k norms that the module multiplies with v.
- Hugging Face (the modules the model class records as ``attentions``, which is what
  ``output_attentions=True`` returns): run with the eager attention implementation (the
  config's ``_attn_implementation`` set to ``"eager"`` for the call); their second output.

With ``gradients=True`` the output of the patch embedding is made a leaf that requires
grad, so the whole stack of blocks is in the graph and the class scores can be
differentiated with respect to every block's probabilities (:meth:`CapturedAttention.gradients`).
Windowed attention (Swin), whose matrices are not over all patch tokens, is captured by
none of the adapters.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from visaudit.tasks.model.layout import MAX_PREFIX_TOKENS, patch_embedding

Family = Literal["torchvision", "timm", "hf"]


@dataclass
class CapturedAttention:
    """Per self-attention block, in execution order: the (N, heads, T, T) probabilities, and
    the tensor of the graph they are (a view of), for gradients."""

    probabilities: list[torch.Tensor] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)

    def add(self, probabilities: torch.Tensor, source: torch.Tensor) -> None:
        """Record one block's probabilities; matrices that are not square (cross-attention of a
        pooling query) are not self-attention over the tokens and are left out."""
        if probabilities.dim() == 4 and probabilities.shape[-1] == probabilities.shape[-2]:
            self.probabilities.append(probabilities)
            self.sources.append(source)

    def gradients(self, objective: torch.Tensor) -> list[torch.Tensor]:
        """``d objective / d A_l`` for every block, each (N, heads, T, T); the graph is kept
        (other methods backpropagate through the same forward afterwards). Needs a capture
        made with ``gradients=True``."""
        if not all(source.requires_grad for source in self.sources):
            raise ValueError("the attention was captured without gradients; use captured_attention(..., gradients=True)")
        grads = torch.autograd.grad(objective, self.sources, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.reshape(p.shape)
                for p, g in zip(self.probabilities, grads)]


def class_token_prefix(captured: CapturedAttention, grid: tuple[int, int]) -> int:
    """The number ``k`` of leading tokens (the class token first) before the h*w patch tokens.

    Raises ValueError when no attention was captured, when the blocks' token counts differ
    (a hierarchical model), or when there is no leading token (a model without a class token,
    whose scores read pooled patch tokens, has no class-token row to roll out)."""
    counts = {int(p.shape[-1]) for p in captured.probabilities}
    if len(counts) != 1:
        raise ValueError(f"attention rollout needs global attention over one token set in every block; "
                         f"captured {len(captured.probabilities)} block(s) with token counts {sorted(counts)}")
    prefix = counts.pop() - grid[0] * grid[1]
    if not 1 <= prefix <= MAX_PREFIX_TOKENS:
        raise ValueError(f"attention rollout reads the class token's row: the blocks' {prefix + grid[0] * grid[1]} "
                         f"tokens are not a leading class token and the {grid[0]}x{grid[1]} patch tokens")
    return prefix


def _hf_attention_class(model: nn.Module) -> tuple[nn.Module, type] | None:
    """The Hugging Face model inside ``model`` and the module class it records as ``attentions``."""
    for module in model.modules():
        recorded = (getattr(type(module), "_can_record_outputs", None) or {}).get("attentions")
        config = getattr(module, "config", None)
        if recorded is not None and hasattr(config, "_attn_implementation"):
            target = getattr(recorded, "target_class", recorded)  # a class, or an OutputRecorder naming one
            if isinstance(target, type):
                return module, target
    return None


def _timm_attention(module: nn.Module) -> bool:
    """A timm attention module with a switchable fused path and an ``attn_drop`` on its probabilities."""
    return (type(module).__module__.startswith("timm.") and isinstance(getattr(module, "fused_attn", None), bool)
            and isinstance(getattr(module, "attn_drop", None), nn.Dropout))


def attention_family(model: nn.Module) -> Family | None:
    """Which adapter reads the model's attention, or None when it has no global self-attention modules."""
    if _hf_attention_class(model) is not None:
        return "hf"
    if any(_timm_attention(module) for module in model.modules()):
        return "timm"
    if any(isinstance(module, nn.MultiheadAttention) for module in model.modules()):
        return "torchvision"
    return None


def _ask_for_weights(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


@contextmanager
def captured_attention(model: nn.Module, gradients: bool = False) -> Iterator[CapturedAttention]:
    """While the block runs, every forward of ``model`` appends its blocks' attention
    probabilities to the yielded :class:`CapturedAttention` (see the module docstring).
    Raises ValueError for a model without global self-attention modules."""
    family = attention_family(model)
    if family is None:
        raise ValueError("the model has no self-attention modules (torchvision nn.MultiheadAttention, timm Attention "
                         "or a Hugging Face attention) whose probabilities could be read")
    captured = CapturedAttention()
    handles: list[torch.utils.hooks.RemovableHandle] = []
    restore: list[Callable[[], None]] = []

    def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) else output
        if isinstance(weights, torch.Tensor):
            base = weights._base if family == "torchvision" and weights._base is not None else weights
            captured.add(weights, base)

    try:
        if family == "torchvision":
            for module in model.modules():
                if isinstance(module, nn.MultiheadAttention):
                    handles.append(module.register_forward_pre_hook(_ask_for_weights, with_kwargs=True))
                    handles.append(module.register_forward_hook(keep))
        elif family == "timm":
            for module in filter(_timm_attention, model.modules()):
                restore.append(lambda m=module, flag=module.fused_attn: setattr(m, "fused_attn", flag))
                module.fused_attn = False
                handles.append(module.attn_drop.register_forward_hook(keep))
        else:
            found = _hf_attention_class(model)
            assert found is not None
            owner, attention_class = found
            modules = [m for m in model.modules() if isinstance(m, attention_class)]
            configs = {id(c): c for c in [owner.config] + [getattr(m, "config", None) for m in modules] if c is not None}
            for config in configs.values():  # the model's and its attention modules' (a sub-config) read the flag
                restore.append(lambda c=config, impl=config._attn_implementation: setattr(c, "_attn_implementation", impl))
                config._attn_implementation = "eager"
            handles.extend(m.register_forward_hook(keep) for m in modules)
        if gradients:
            embedding = patch_embedding(model)
            if embedding is None:
                raise ValueError("gradients of the attention need a patch embedding (a Conv2d with kernel == stride)")
            handles.append(embedding.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for undo in reversed(restore):
            undo()
