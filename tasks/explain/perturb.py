"""What the perturbation methods share: input and option checks, the baseline a muted pixel
takes, the scores a perturbed copy is judged by, and the chunk size that keeps the copies in memory.

Occlusion (:mod:`visaudit.tasks.explain.occlusion`) and RISE deletion/insertion
(:mod:`visaudit.tasks.explain.rise`) both run many perturbed copies of each image::

    x' = x * (1 - m) + b * m        (m the perturbation's binary mask, b the baseline)

and judge each by the model's output s: probabilities through the model's
:class:`~visaudit.tasks.model.head.Head` (softmax, or sigmoid for multi-label models), or logits.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from visaudit.tasks.model.head import Head
from visaudit.tasks.model.hooks import forward_hooks

BASELINES = ("zero", "mean", "blur")
OUTPUTS = ("probability", "logit")
# Muted copies + activations of one chunk stay under 64 MiB on the CPU: chunks that fit the
# caches run faster. Measured (2 cores, 4 images, 7x7 grid at 224 px): resnet50 6.6-7.7 s with
# chunks of 1-4 images, 10.4 s with 16, 14.2 s with 76 (the 1 GiB budget); resnet18 2.5-3.2 s
# against 4.3 s.
CPU_BUDGET_BYTES = 64 << 20
CUDA_FREE_FRACTION = 0.5  # share of the free device memory one chunk may use


def check_inputs(inputs: torch.Tensor) -> None:
    """Refuse anything but a floating-point (N, C, H, W) batch of normalised images."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a (N, C, H, W) tensor, got {shape}")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point (normalised images), got {inputs.dtype}")


def check_output(output: str, head: Head) -> None:
    """Refuse an ``output`` other than "probability" or "logit", and a ``head`` that is not a :class:`Head`."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if not isinstance(head, Head):
        raise TypeError(f"head must be a Head (softmax or sigmoid), got {type(head).__name__}")


def check_chunk(chunk_size: int | None) -> None:
    """Refuse a chunk size that is not a positive int or None (automatic)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")


def to_scores(logits: torch.Tensor, output: str, head: Head) -> torch.Tensor:
    """(N, K) logits -> float32 scores: the logits themselves, or the head's probabilities."""
    if logits.dim() != 2:
        raise ValueError(f"the model must return (N, K) class scores, got shape {tuple(logits.shape)}")
    if output == "logit":
        return logits.float()
    return head.probabilities(logits)


def blurred(inputs: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """A strongly Gaussian-blurred copy (sigma default min(H, W)/16 px, kernel 2*ceil(3 sigma)+1)."""
    import torchvision.transforms.functional as TF

    h, w = inputs.shape[-2:]
    sigma = float(sigma) if sigma is not None else max(min(h, w) / 16.0, 1.0)
    kernel = 2 * math.ceil(3 * sigma) + 1
    largest = 2 * min(h, w) - 1  # reflect padding needs kernel // 2 < the image side
    kernel = min(kernel, largest if largest % 2 else largest - 1)
    return TF.gaussian_blur(inputs, [kernel, kernel], [sigma, sigma])


def baseline_images(
    inputs: torch.Tensor, baseline: str, mean: tuple[float, ...] | None = None, blur_sigma: float | None = None
) -> torch.Tensor:
    """The fill for muted pixels, broadcastable to ``inputs``: (1|N, C, 1|H, 1|W).

    zero -> 0;  mean -> per-image per-channel mean of ``inputs`` (or ``mean``);
    blur -> :func:`blurred` copy of each image (sigma ``blur_sigma``).
    """
    n, c = inputs.shape[:2]
    if baseline == "zero":
        return inputs.new_zeros((1, c, 1, 1))
    if baseline == "mean":
        if mean is None:
            return inputs.mean(dim=(2, 3), keepdim=True)
        if len(mean) != c:
            raise ValueError(f"mean has {len(mean)} values but the inputs have {c} channels")
        return torch.tensor(mean, dtype=inputs.dtype, device=inputs.device).view(1, c, 1, 1)
    return blurred(inputs, blur_sigma)


def cover(length: int, window: int, stride: int, count: int, device: torch.device) -> torch.Tensor:
    """(count, length) bool: window i covers positions [i*stride, i*stride + window)."""
    pos = torch.arange(length, device=device)
    start = torch.arange(count, device=device)[:, None] * stride
    return (pos[None] >= start) & (pos[None] < start + window)


def take(base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of a per-image tensor, or the shared one when it has a single row."""
    return base if base.shape[0] == 1 else base[index]


def _available_bytes(device: torch.device) -> int:
    """What one chunk may use: half the free CUDA memory, or min(64 MiB, available RAM / 4) on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 * CPU_BUDGET_BYTES
    return int(min(CPU_BUDGET_BYTES, available // 4))


def probe_activation(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Forward ``x`` (one image) and measure the largest module output, in bytes per image
    (a TorchScript model, whose modules refuse hooks: :func:`largest_saved_activation`)."""
    if isinstance(model, torch.jit.ScriptModule):
        return largest_saved_activation(model, x)
    largest = [0]

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size() // max(1, output.shape[0]))

    with forward_hooks((module, hook) for module in model.modules()):
        logits = model(x)
    return logits, largest[0]


def largest_saved_activation(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Forward ``x`` with autograd on and measure the largest tensor autograd saves for the
    backward, parameters and buffers aside, in bytes per image: the saved tensors are the
    operations' inputs, so the largest is the largest activation, as the module hooks measure
    it on a Python model. Runs outside inference mode on a copy of ``x``; the logits come back
    detached."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    count = x.shape[0]
    largest = [0]

    def pack(saved: torch.Tensor) -> torch.Tensor:
        if saved.dim() and saved.shape[0] == count and saved.untyped_storage().data_ptr() not in weights:
            largest[0] = max(largest[0], saved.numel() * saved.element_size() // count)
        return saved

    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x.clone().requires_grad_(True))
    return logits.detach(), largest[0]


def auto_chunk(per_image_input: int, per_image_activation: int, device: torch.device) -> int:
    """Images per forward such that muted copies plus live activations fit the budget:

    chunk * (2 * C*H*W*bytes + 4 * largest activation per image) <= budget
    (CUDA: half the free memory, torch.cuda.mem_get_info; CPU: min(64 MiB, available / 4)).
    """
    per_image = 2 * per_image_input + 4 * per_image_activation
    return max(1, _available_bytes(device) // max(1, per_image))


def chunk_for(model: nn.Module, x: torch.Tensor, chunk_size: int | None) -> tuple[int, torch.Tensor | None]:
    """The chunk size to use: ``chunk_size``, or when None one measured on the first image
    (:func:`auto_chunk`), returned with that image's logits so its forward is not repeated."""
    if chunk_size is not None:
        return chunk_size, None
    first, largest = probe_activation(model, x[:1])
    return auto_chunk(x[0].numel() * x.element_size(), largest, x.device), first
