"""Model-randomisation sanity check for saliency methods (Adebayo et al., NeurIPS 2018).

An explanation that explains the model must change when the model's learnt weights are
destroyed. Cascading randomisation re-initialises the model's layers from the top
(classifier first, then the stages below it, one step at a time) in a COPY of the model,
and compares each method's maps before and after with the Spearman rank correlation::

    rho_s(step) = mean over images of spearman(vec(L_original), vec(L_randomised(step)))

A method whose maps keep a high rank correlation after the classifier and the explained
stage are randomised depends little on what the model learnt (Adebayo et al. found this
for Guided Backprop and Guided Grad-CAM, not for Grad-CAM): the report marks it untrustworthy.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from visaudit.tasks.explain.attention_maps import attention_maps
from visaudit.tasks.explain.cam import explain
from visaudit.tasks.explain.catalogue import ATTENTION_LAYER, ATTENTION_METHODS, GUIDED_METHODS, INPUT_LAYER
from visaudit.tasks.explain.guided import guided_saliency
from visaudit.tasks.explain.ranks import spearman
from visaudit.tasks.explain.registry import METHODS
from visaudit.tasks.model.attention import captured_attention
from visaudit.tasks.model.hooks import hooked_forward
from visaudit.tasks.model.layout import token_grid


def cascade(model: nn.Module, stages: list[str]) -> list[list[str]]:
    """Randomisation steps, top first: the classifier (the last ``nn.Linear``), then each
    stage from the deepest down; each step re-initialises everything up to it."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    top = linears[-1:] if linears else []
    steps, done = [], list(top)
    if top:
        steps.append(list(done))
    for stage in reversed(stages):
        done.append(stage)
        steps.append(list(done))
    return steps


def randomised_copy(model: nn.Module, modules: list[str], seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with ``modules`` (and everything inside them) re-initialised
    by their own ``reset_parameters``, under a fixed seed; the user's model is untouched."""
    clone = copy.deepcopy(model)
    named = dict(clone.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in modules:
            for sub in named[name].modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()  # type: ignore[operator]
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.reset_running_stats()
    return clone.eval()


@dataclass(frozen=True)
class SanityResult:
    """Per randomisation step and method: the mean and spread of the rank correlations."""

    rows: pd.DataFrame  # step, randomised, method, layer, spearman_mean, spearman_std, images


def maps_for(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, layer: str,
             methods: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """method -> (N, L) flattened maps of each image for its ``target`` class, from one forward
    (guided maps as stored: :func:`visaudit.tasks.explain.guided.guided_saliency`; attention
    maps from the attention captured in that forward)."""
    guided = any(m in GUIDED_METHODS for m in methods)
    attention = tuple(m for m in methods if m in ATTENTION_METHODS)
    capture = captured_attention(model, gradients="gradient_rollout" in attention) if attention else nullcontext(None)
    with capture as captured:
        forward = hooked_forward(model, inputs, [layer], guided=guided)
    sample = torch.arange(inputs.shape[0], device=inputs.device)
    maps = {}
    if captured is not None:
        grid = token_grid(model, (int(inputs.shape[-2]), int(inputs.shape[-1]))) or (0, 0)
        maps.update(attention_maps(captured, forward.scores, sample, target, attention, grid))
    maps.update(explain(forward, sample, target, tuple(m for m in methods if m not in ATTENTION_METHODS)))
    out = {}
    for method in methods:
        if method in ATTENTION_METHODS:
            out[method] = maps[(method, ATTENTION_LAYER)].flatten(1).detach()
        elif method in GUIDED_METHODS:
            out[method] = guided_saliency(maps[(method, INPUT_LAYER)]).flatten(1).detach()
        else:
            out[method] = maps[(method, layer)].flatten(1).detach()
    return out


def sanity_check(model: nn.Module, inputs: torch.Tensor, layer: str, stages: list[str],
                 methods: tuple[str, ...], seed: int = 0) -> pd.DataFrame:
    """Cascading randomisation of ``model`` (a copy) explained on ``inputs`` for the ORIGINAL
    model's predicted classes; one row per (step, method) with the Spearman statistics."""
    if inputs.shape[0] < 2:
        raise ValueError("the sanity check needs at least 2 images")
    with torch.no_grad():
        target = model(inputs).argmax(dim=1)
    reference = maps_for(model, inputs, target, layer, methods)
    rows = []
    for step, modules in enumerate(cascade(model, stages), start=1):
        randomised = randomised_copy(model, modules, seed)
        changed = maps_for(randomised, inputs, target, layer, methods)
        for method in methods:
            # a flat reference map has no ranks to keep: skip it; a map that went flat kept none: 0
            informative = reference[method].std(dim=1) > 0
            rho = torch.nan_to_num(spearman(reference[method], changed[method]), nan=0.0)
            valid = rho[informative]
            rows.append({
                "step": step,
                "randomised": "+".join(modules),
                "method": method,
                "layer": METHODS[method].stored_layer(layer),
                "spearman_mean": float(valid.mean()) if valid.numel() else float("nan"),
                "spearman_std": float(valid.std()) if valid.numel() > 1 else float("nan"),
                "images": int(valid.numel()),
            })
    return pd.DataFrame(rows)
