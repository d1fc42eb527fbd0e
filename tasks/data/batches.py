"""Decoded images as tensors on the device: batches, normalisation, and JPEG decoding on a GPU.

:mod:`visaudit.tasks.data.images` decodes on the CPU (PIL) without torch; this module holds
what needs it: nvJPEG decoding with the resize and crop done batched on the GPU
(:func:`decode_jpegs_on_gpu`, called by ``images.decode_many`` on a CUDA device), stacking
decoded images into a uint8 batch (:func:`to_batch`), and the model's normalisation
(:func:`normalise`, :func:`standardise`).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import numpy as np
import torch

from visaudit.tasks.data.images import Decoded, Preprocess


def decode_jpegs_on_gpu(datas: list[bytes], pre: Preprocess, device: torch.device) -> list[Decoded | None]:
    """Batched nvJPEG decode, then :func:`fit_on_device`; None where the GPU cannot decode (the
    caller falls back to PIL). On CUDA the kernels go to a side stream, so that decoding the next
    batch (on the shard's prefetch thread) runs beside the model's kernels on the default stream;
    this thread waits for them before handing the images over."""
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    side = None
    if device.type == "cuda":
        side = _decode_stream(torch.cuda.current_device() if device.index is None else device.index)
    with torch.cuda.stream(side) if side is not None else nullcontext():
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        except Exception:  # no nvJPEG, a file it refuses, or torchvision without decoders: PIL takes over
            return [None] * len(datas)
        out: list[Decoded | None] = list(fit_on_device(images, pre))
    if side is not None:
        side.synchronize()
    return out


@functools.cache
def _decode_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=index)


def fit_on_device(images: list[torch.Tensor], pre: Preprocess) -> list[Decoded]:
    """:func:`fit` for (3, H, W) uint8 tensors: images of one size are resized (bilinear, antialiased)
    and cropped as one batch, so a dataset of one image size costs one ``interpolate`` per batch."""
    import torch.nn.functional as F

    out: list[Decoded | None] = [None] * len(images)
    sizes: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        sizes.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(i)
    for (height, width), members in sizes.items():
        scale = pre.resize / min(width, height)
        new_w, new_h = max(pre.resize, round(width * scale)), max(pre.resize, round(height * scale))
        left = int(round((new_w - pre.crop) / 2.0))
        top = int(round((new_h - pre.crop) / 2.0))
        step = max(1, 2**26 // (3 * max(height * width, new_h * new_w)))  # per interpolate: <= 256 MiB of float32
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            batch = torch.stack([images[i] for i in chunk])
            if (new_w, new_h) != (width, height):
                batch = F.interpolate(batch.float(), size=(new_h, new_w), mode="bilinear", antialias=True,
                                      align_corners=False).round().clamp(0, 255).to(torch.uint8)
            crops = batch[:, :, top : top + pre.crop, left : left + pre.crop]
            for k, i in enumerate(chunk):
                out[i] = Decoded(crops[k], height, width, scale, left, top)  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def to_batch(images: list[Decoded], device: torch.device) -> torch.Tensor:
    """Stack decoded images into a (N, 3, H, W) uint8 tensor on ``device``."""
    if any(isinstance(d.pixels, torch.Tensor) for d in images):  # decoded on the GPU (some maybe by PIL)
        if device.type == "cuda":  # decoded on the side stream, read on this one: not reused before this reads them
            for d in images:
                if isinstance(d.pixels, torch.Tensor) and d.pixels.is_cuda:
                    d.pixels.record_stream(torch.cuda.current_stream(device))
        return torch.stack([
            d.pixels if isinstance(d.pixels, torch.Tensor)
            else torch.from_numpy(np.array(d.pixels)).permute(2, 0, 1).to(device)
            for d in images
        ]).to(device)
    array = np.stack([d.pixels for d in images])
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.contiguous()


def normalise(batch: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 RGB (N,3,H,W) -> float, scaled to [0,1], channels reversed for a BGR model, and
    standardised with the model's mean/std: ``x = (p / 255 - mean) / std``."""
    return standardise(batch.float() / 255.0, pre)


def standardise(pixels: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """RGB pixels in [0, 1] (N,3,H,W, float) -> the model's input: channels reversed for a BGR
    model, then ``x = (p - mean) / std``; differentiable (attacks work in the [0, 1] pixel space)."""
    mean = torch.tensor(pre.mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return ((pixels.flip(1) if pre.channels == "bgr" else pixels) - mean) / std
